import evaluate
from evaluate.utils import launch_gradio_widget

# The metric Space's page (this folder pushed to a Space): a form that runs the metric.
launch_gradio_widget(evaluate.load("xray_classification"))
