"""The three classes, spelled once: the folder names of the prepared tree and the names a model shows."""

# Folder names. Alphabetical, because imagefolder numbers the classes in sorted order.
CLASS_NAMES = ("bacterial_pneumonia", "normal", "viral_pneumonia")
DISPLAY_NAMES = {
    "bacterial_pneumonia": "Bacterial pneumonia",
    "normal": "Normal",
    "viral_pneumonia": "Viral pneumonia",
}
# The id2label of every model this project trains: label ids in the order imagefolder gives them.
ID2LABEL = {index: DISPLAY_NAMES[name] for index, name in enumerate(CLASS_NAMES)}
