"""Distil inside *your own* training loop with ``kdlab.Distiller`` — your models, your data, your optimizer.

``Teacher`` and ``Student`` below are ordinary PyTorch modules that know nothing about kdlab; the data are plain
tensors. The teacher is trained with a plain cross-entropy loop, then the student is distilled from it::

    distiller = kdlab.Distiller(student, teacher, method="kd", temperature=4.0, ce_weight=0.1, kd_weight=0.9,
                                student_taps={"classifier": "fc", "features": "body"},
                                teacher_taps={"classifier": "head", "features": "trunk"})
    distiller.setup(x_first)                                  # builds connectors (FitNet, SimKD, ...) if any
    optimizer = torch.optim.SGD(distiller.parameters(), ...)  # student + connector / learnable temperature
    step = distiller(x, y)                                    # step.loss, step.terms, step.logits

Run from the repository root (CPU, seconds)::

    python examples/own_loop.py                    # KD
    python examples/own_loop.py --method fitnet    # a connector trained with the student
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import kdlab


class Teacher(nn.Module):
    """A wider MLP for 40-dimensional inputs; its final ``nn.Linear`` is called ``head``."""

    def __init__(self, num_classes: int = 10, width: int = 128) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(40, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


class Student(nn.Module):
    """A narrow MLP; its final ``nn.Linear`` is called ``fc``."""

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(40, width), nn.BatchNorm1d(width), nn.ReLU())
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


STUDENT_TAPS = {"classifier": "fc", "features": "body"}
TEACHER_TAPS = {"classifier": "head", "features": "trunk"}


def make_data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Your data: here 10 noisy Gaussian classes in 40 dimensions, as plain tensors."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(10, 40, generator=torch.Generator().manual_seed(1234)) * 0.6
    y = torch.randint(0, 10, (n,), generator=g)
    x = centers[y] + torch.randn(n, 40, generator=g)
    return x, y


def accuracy(predict, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return 100.0 * float((predict(x).argmax(1) == y).float().mean())


def train_teacher(x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int = 128) -> Teacher:
    """A plain PyTorch loop: nothing kdlab-specific."""
    teacher = Teacher()
    opt = torch.optim.SGD(teacher.parameters(), lr=0.1, momentum=0.9)
    for _ in range(epochs):
        teacher.train()
        for i in torch.randperm(len(x)).split(batch):
            loss = nn.functional.cross_entropy(teacher(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return teacher


def distill(
    teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, method: str, batch: int = 128, **params: float
) -> tuple[kdlab.Distiller, dict[str, float]]:
    """The student's loop with ``kdlab.Distiller``: returns the distiller (its ``student`` and ``predict``) and the
    last epoch's mean loss terms."""
    student = Student()
    distiller = kdlab.Distiller(
        student, teacher, method=method, student_taps=STUDENT_TAPS, teacher_taps=TEACHER_TAPS, **params
    )
    distiller.setup(x[:batch])  # connectors are shaped by the data: build them before the optimizer sees parameters()
    opt = torch.optim.SGD(distiller.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    terms: dict[str, float] = {}
    for epoch in range(1, epochs + 1):
        distiller.train()
        sums: dict[str, float] = {}
        for i in torch.randperm(len(x)).split(batch):
            step = distiller(x[i], y[i], epoch=epoch)
            opt.zero_grad()
            step.loss.backward()
            opt.step()
            for k, v in step.numbers().items():  # the terms and their sum as floats, for logging
                sums[k] = sums.get(k, 0.0) + v * len(i)
        sched.step()
        terms = {k: v / len(x) for k, v in sums.items()}
        print(f"epoch {epoch}/{epochs}  " + "  ".join(f"{k} {v:.4f}" for k, v in terms.items()), flush=True)
    return distiller, terms


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="kd", help="any kdlab method: kd, dkd, mse, fitnet, simkd, ... (kdlab keys)")
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--student-epochs", type=int, default=10)
    parser.add_argument("--num-samples", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: fastest for tiny MLPs)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = make_data(args.num_samples)
    x_test, y_test = make_data(1000, seed=1)
    teacher = train_teacher(x, y, args.teacher_epochs)
    teacher_acc = accuracy(teacher.eval(), x_test, y_test)
    print(f"teacher test accuracy {teacher_acc:.2f}%")
    # KD with the papers' settings; FitNet on the one tapped feature (its default hint, stage 2 as released, needs
    # models that name their stages: features: [...])
    params = {"kd": {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9}, "fitnet": {"hint_layer": None}}
    params = params.get(args.method, {})
    distiller, terms = distill(teacher, x, y, args.student_epochs, args.method, **params)
    student_acc = accuracy(distiller.eval().predict, x_test, y_test)  # SimKD/IJCKD predict through the teacher head
    print(f"student ({args.method}) test accuracy {student_acc:.2f}%")
    return {"teacher_acc": teacher_acc, "student_acc": student_acc, **terms}


if __name__ == "__main__":
    main()
