"""Reference: the benchmark CNN in PyTorch, eager and torch.compile, written as users write it.

python tools/bench/bench_refs/torch_ref.py --batches=1024,4096 [--impls=eager,compile] [--json]

Runs on CUDA when it is available (TF32 on for matmuls and convolutions, the like-for-like
partner of JAX's default f32 precision on GPUs; --no-tf32 turns it off), else on the CPU with
PyTorch's default threads. Needs the `bench` extra.
"""

from __future__ import annotations

import argparse
import time

import common

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError as e:
    common.missing_deps("PyTorch", e)

IMPLS = ("eager", "compile")


class TorchCNN(nn.Module):
    """Embedding -> Conv1d (valid, relu) -> MaxPool1d per tower; concat; flatten; MLP."""

    def __init__(self, max_len: int, item_vocab: int, embed_dim: int):
        super().__init__()
        vocabs = common.vocabs(item_vocab)
        self.embeddings = nn.ModuleList(nn.Embedding(v, embed_dim) for v in vocabs)
        self.convs = nn.ModuleList(
            nn.Conv1d(embed_dim, common.FILTERS, common.KERNEL_SIZE) for _ in vocabs
        )
        self.pool = nn.MaxPool1d(common.POOL)
        self.dropout = nn.Dropout(common.DROPOUT)
        self.hidden = nn.Linear(common.flat_features(max_len), common.HIDDEN)
        self.out = nn.Linear(common.HIDDEN, 1)

    def forward(self, ids: list[torch.Tensor]) -> torch.Tensor:
        towers = [
            self.pool(torch.relu(conv(emb(x).transpose(1, 2))))
            for x, emb, conv in zip(ids, self.embeddings, self.convs, strict=True)
        ]
        h = self.dropout(torch.cat(towers, dim=1).flatten(1))
        h = self.dropout(torch.relu(self.hidden(h)))
        return self.out(h).squeeze(1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(impl: str, batch: int, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = TorchCNN(args.max_len, args.item_vocab, args.embed_dim).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=common.LEARNING_RATE)
    fwd = torch.compile(model) if impl == "compile" else model
    batches = [
        (
            [torch.as_tensor(b[k], dtype=torch.long, device=device) for k in common.ID_KEYS],
            torch.as_tensor(b["label"], device=device),
        )
        for b in common.make_batches(batch, args.max_len, args.item_vocab)
    ]

    def train(steps: int) -> None:
        model.train()
        for i in range(steps):
            ids, label = batches[i % len(batches)]
            opt.zero_grad(set_to_none=True)
            F.binary_cross_entropy_with_logits(fwd(ids), label).backward()
            opt.step()
        _sync(device)

    def score(steps: int) -> None:
        model.eval()
        with torch.inference_mode():
            for i in range(steps):
                torch.sigmoid(fwd(batches[i % len(batches)][0])).cpu()
        _sync(device)

    out = {"impl": f"torch-{impl}", "batch": batch}
    for name, run in (("train", train), ("score", score)):
        run(3)  # compile and warm up
        t0 = time.perf_counter()
        run(3)
        steps, secs, cpu = common.timed_runs_cpu(
            run, (time.perf_counter() - t0) / 3, args.seconds, args.repeats
        )
        out.update(
            {
                f"{name}_ex_per_s": common.ex_per_s(batch, steps, secs),
                f"{name}_ex_per_cpu_s": batch / cpu,
                f"{name}_steps": steps,
                f"{name}_secs": secs,
            }
        )
    out["versions"] = {"torch": torch.__version__}
    out["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    out["threads"] = torch.get_num_threads()
    if device.type == "cuda":
        out["tf32"] = args.tf32
    return out


def main() -> None:
    parser = common.arg_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--tf32", action=argparse.BooleanOptionalAction, default=True, help="CUDA only"
    )
    args = parser.parse_args()
    impls = [i for i in args.impls.split(",") if i] or list(IMPLS)
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        parser.error(f"--impls: unknown {unknown}; choose from {list(IMPLS)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    for batch in args.batches:
        for impl in impls:
            common.emit(bench(impl, batch, args, device), args.json)


if __name__ == "__main__":
    main()
