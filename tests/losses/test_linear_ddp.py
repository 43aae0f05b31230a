"""fused_linear_distill under DDP (two gloo processes): the head's weight gradient is an ordinary
autograd gradient, so DDP's hooks all-reduce it like any other parameter's."""
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import copy, sys, torch, torch.distributed as dist, fastkd
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)

    class Student(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(8, 8)
            self.lm_head = torch.nn.Linear(8, 50, bias=False)

        def forward(self, x):  # hidden states only: the head goes into the loss
            return torch.tanh(self.body(x))

    model = Student()
    ref = copy.deepcopy(model)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(world, 12, 8, generator=g), torch.randn(world, 12, 50, generator=g)
    y = torch.randint(0, 50, (world, 12), generator=g)
    y[:, :2] = -100
    loss = fastkd.fused_linear_distill(ddp(x[rank]), model.lm_head.weight, v[rank], y[rank], method="jsd",
                                       chunk_size=5, backend="torch")
    loss.backward()
    crit = fastkd.DistillLoss("jsd", backend="torch")
    total = sum(crit(ref.lm_head(ref(x[r])), v[r], y[r]) for r in range(world)) / world  # DDP averages
    total.backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=lambda m: name + ": " + m)
    sys.stdout.write(f"rank {rank} ok\\n")  # one write per line: the two ranks share the pipe
    sys.stdout.flush()
    del ddp  # the reducer (it holds the process group) freed now, not during interpreter exit
    dist.destroy_process_group()
''')


@pytest.mark.slow
def test_ddp_all_reduces_the_head_weight_gradient(tmp_path):
    script = tmp_path / "ddp_linear.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], capture_output=True, text=True, timeout=240,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "rank 0 ok" in proc.stdout and "rank 1 ok" in proc.stdout
