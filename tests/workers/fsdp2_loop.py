"""A custom training loop with the fused loss: run sharded with FSDP2 on 2 CPU processes (gloo), or in one process.

``python -m torch.distributed.run --nproc_per_node 2 fsdp2_loop.py OUT fsdp`` shards every layer and the LM head with
``fully_shard`` and passes the LM-head *module* to ``fused_policy_loss``; ``python fsdp2_loop.py OUT single`` runs the
same steps unsharded, averaging the two ranks' losses as data parallelism averages their gradients. Each process
writes its final (full) parameters to ``OUT/<mode>-<rank>.pt``.
"""

import os
import sys

import torch

import fused_gspo

V, H, T, B, STEPS = 37, 16, 6, 3, 3


class Policy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(V, H)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(H, H) for _ in range(2)])
        self.lm_head = torch.nn.Linear(H, V, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def micro_batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(0, V, (B, T + 1), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.2).float()
    mask[:, 0] = 1
    advantages = torch.randn(B, generator=g)
    old = torch.randn(B, T, generator=g) * 0.05 - 3.6
    return ids, mask, advantages, old


def loss_of(model, rank: int, step: int):
    ids, mask, advantages, old = micro_batch(rank, step)
    hidden = model(ids[:, :-1])
    out = fused_gspo.fused_policy_loss(
        hidden, model.lm_head, ids[:, 1:], advantages, mask, old_logps=old, backend="torch",
        loss_type="grpo", importance_sampling_level="sequence", workspace_bytes=V * 12 * 5,
    )  # fmt: skip
    return out.loss


def main(out_dir: str, mode: str) -> None:
    torch.manual_seed(0)
    model = Policy()
    rank, world = 0, 2
    if mode == "fsdp":
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model.lm_head, mesh=mesh)
        fully_shard(model, mesh=mesh)
        try:  # the sharded weight itself, with each rank's own data (data parallelism), is refused, with the way out
            ids = torch.full((1, 1), rank, dtype=torch.long)
            fused_gspo.fused_policy_loss(torch.ones(1, 1, H), model.lm_head.weight, ids, torch.ones(1), ids * 0 + 1)
            raise AssertionError("a DTensor weight was accepted")
        except fused_gspo.parallel.ReplicaMismatchError as exc:
            assert "pass the LM-head module" in str(exc), exc
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(STEPS):
        optimizer.zero_grad()
        if mode == "fsdp":
            loss_of(model, rank, step).backward()  # FSDP2 averages the ranks' gradients
        else:
            (sum(loss_of(model, r, step) for r in range(world)) / world).backward()
        optimizer.step()
    params = {
        name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for name, p in model.named_parameters()
    }
    torch.save(params, os.path.join(out_dir, f"{mode}-{rank}.pt"))
    if mode == "fsdp":
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
