"""Run by tests/test_baseline_methods.py under torchrun (2 processes, gloo): CRD steps on rank-specific batches of
different sizes; writes each rank's final memory, Z and the gathered embeddings of every step to $OUT/rank{r}.pt."""

import os
import sys

import torch
import torch.distributed as dist

from kdlab.methods import build_method
from kdlab.models import build

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)  # same memory, embeddings and models on every rank
n = 40
labels = torch.arange(n) % 4
method = build_method("crd", {"nce_k": 16})
method.bind_data(n, labels)
student, teacher = build("mnist1d_mlp", num_classes=4), build("mnist1d_cnn", num_classes=4).eval()
x_all = torch.randn(n, 40)
method.setup(student, teacher, x_all[:2])
initial = (method.memory_student.clone(), method.memory_teacher.clone())
torch.manual_seed(100 + rank)  # noise indices differ per rank, as under the engine
steps = []
for step in range(3):
    # global batch of 8: rank 0 takes 5 samples, rank 1 the other 3
    idx = torch.arange(8 * step, 8 * step + 8)
    local = idx[:5] if rank == 0 else idx[5:]
    s_out = student.forward_features(x_all[local])
    with torch.no_grad():
        t_out = teacher.forward_features(x_all[local])
    terms = method.losses(s_out, t_out, labels[local], 1, index=local)
    sum(terms.values()).backward()
    with torch.no_grad():
        e_s = method.embed_student(s_out.pooled)
        e_t = method.embed_teacher(t_out.pooled)
    from kdlab.methods.crd import gather_rows

    steps.append((gather_rows(local), gather_rows(e_s), gather_rows(e_t)))
torch.save({"memory_student": method.memory_student, "memory_teacher": method.memory_teacher, "z": method.z,
            "initial": initial, "steps": steps}, os.path.join(sys.argv[1], f"rank{rank}.pt"))  # fmt: skip
dist.destroy_process_group()
