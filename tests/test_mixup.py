"""--mixup_alpha (cxr.mixup): training batches blended image with image and label with label, the teacher's view
with the same share and pairing; evaluation batches untouched."""

import pytest
import torch
import torch.nn.functional as F
from transformers import TrainingArguments

from cxr.labels import ID2LABEL
from cxr.mixup import mix_batch
from cxr.models import build_model
from cxr.training import XrayTrainer, weighted_loss


def a_batch():
    pixel_values = torch.randn(6, 3, 32, 32)
    return {
        "pixel_values": pixel_values,
        "teacher_pixel_values": 2 * pixel_values,  # a view the test can relate to the student's
        "labels": torch.tensor([0, 1, 2, 0, 1, 2]),
    }


def test_a_mixed_batch_blends_images_and_labels_with_one_share_and_one_pairing():
    torch.manual_seed(0)
    inputs = a_batch()
    inputs["labels"] = torch.arange(6)  # one class per image: a blended label names both images and the share
    mixed = mix_batch(inputs, alpha=0.4, num_classes=6)

    labels = mixed["labels"]
    assert labels.shape == (6, 6) and torch.allclose(labels.sum(dim=1), torch.ones(6))
    share = labels.diagonal().min()
    assert 0 < share < 1
    # one share for the whole batch (an image paired with itself keeps all of its label)
    assert all(own == pytest.approx(share.item()) or own == pytest.approx(1.0) for own in labels.diagonal().tolist())
    partners = [(row - share * F.one_hot(torch.tensor(index), 6)).argmax().item() for index, row in enumerate(labels)]
    assert sorted(partners) == list(range(6))  # a pairing: every image is some image's partner once
    for index, partner in enumerate(partners):
        blend = share * inputs["pixel_values"][index] + (1 - share) * inputs["pixel_values"][partner]
        assert torch.allclose(mixed["pixel_values"][index], blend, atol=1e-5)
    assert torch.allclose(mixed["teacher_pixel_values"], 2 * mixed["pixel_values"], atol=1e-5)
    assert torch.equal(inputs["labels"], torch.arange(6))  # the caller's batch is left as it was


def test_the_loss_of_a_blended_label_is_the_blend_of_the_two_losses():
    """Mixup's loss (Zhang et al.): share x loss(own label) + (1 - share) x loss(partner's), class weights and label
    smoothing included."""
    torch.manual_seed(0)
    logits = torch.randn(6, 3)
    own, partner = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([2, 2, 0, 1, 0, 1])
    loss = weighted_loss(torch.tensor([1.0, 2.0, 3.0]), label_smoothing=0.1)
    blended = 0.7 * F.one_hot(own, 3).float() + 0.3 * F.one_hot(partner, 3).float()
    expected = 0.7 * loss({"logits": logits}, own) + 0.3 * loss({"logits": logits}, partner)
    assert loss({"logits": logits}, blended).item() == pytest.approx(expected.item(), rel=1e-5)


def test_only_training_batches_are_mixed_and_the_teacher_sees_the_blend():
    torch.manual_seed(0)
    student = build_model("scratch-tiny", ID2LABEL)[0]
    teacher = build_model("scratch-tiny-resnet", ID2LABEL)[0]
    seen = {}
    teacher.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(teacher=kwargs["pixel_values"]), with_kwargs=True
    )
    student.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(student=kwargs["pixel_values"]), with_kwargs=True
    )
    args = TrainingArguments(output_dir="unused", report_to="none", use_cpu=True)
    trainer = XrayTrainer(
        model=student,
        args=args,
        compute_loss_func=weighted_loss(torch.ones(3)),
        teacher=teacher,
        distillation="soft",
        mixup_alpha=0.4,
    )
    inputs = a_batch()

    student.train()
    trainer.compute_loss(student, dict(inputs))
    assert not torch.allclose(seen["student"], inputs["pixel_values"])
    assert torch.allclose(seen["teacher"], 2 * seen["student"], atol=1e-5)

    student.eval()
    trainer.compute_loss(student, {"pixel_values": inputs["pixel_values"], "labels": inputs["labels"]})
    assert torch.equal(seen["student"], inputs["pixel_values"])

    student.train()
    XrayTrainer(model=student, args=args, compute_loss_func=weighted_loss(torch.ones(3))).compute_loss(
        student, dict(inputs)
    )
    assert torch.equal(seen["student"], inputs["pixel_values"])  # mixup off by default
    with pytest.raises(ValueError, match="mixup_alpha must be 0"):
        XrayTrainer(model=student, args=args, mixup_alpha=-1)
