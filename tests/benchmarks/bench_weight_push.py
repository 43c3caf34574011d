"""Weight push to two generator actors vs. one plain in-memory copy of the same state dict.

Push = what the learner does every sync: pack the CPU state dict into byte buckets and
``ray.put`` them (:func:`actors.weights.put_buckets`), then both generators fetch every
bucket from the object store (zero-copy numpy views) and copy it into their parameters
(``Generator.update_weights``), measured until both have acknowledged. The baseline is
``{k: v.clone() for k, v in state.items()}`` in the learner process (fresh memory: its time
includes page faults unless the allocator hands back pages it already has, which makes
it bimodal); a ``copy_`` into preallocated tensors (warm memory: the memcpy floor) is
reported too. The broadcast path (``learner.weight_sync: broadcast``: a
:class:`actors.weights.WeightGroup` with this process as rank 0 and the generators as ranks
1-2; gloo here, NCCL on GPUs) is measured as well.

    .venv/bin/python tests/benchmarks/bench_weight_push.py            # ~100M-parameter Qwen2 (random)
    .venv/bin/python tests/benchmarks/bench_weight_push.py --small    # the embedded ~1M model

Last line: ``bench_weight_push ratio: X`` = median push time / median clone time over
``--repeats`` (the first repeat, which warms the object store and the generators, excluded).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from actors.generator import Generator  # noqa: E402
from actors.weights import WeightGroup, plan_buckets, put_buckets  # noqa: E402
from common.modeling import build_demo_model, load_tokenizer  # noqa: E402

log = logging.getLogger("bench_weight_push")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="the embedded ~1M-parameter model instead of ~100M")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bucket-mb", type=int, default=64)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import ray

    tok = load_tokenizer(REPO / "deploy/warmstart")
    if args.small:
        model = build_demo_model(len(tok), seed=0)
    else:
        model = build_demo_model(len(tok), hidden=768, layers=12, heads=12, kv_heads=2, intermediate=3072,
                                 max_positions=2048, seed=0)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d, safe_serialization=True)
        tok.save_pretrained(d)
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}})
        gens = [ray.remote(Generator).options(num_cpus=1).remote(d, torch_threads=1) for _ in range(2)]
        ray.get([g.ping.remote() for g in gens])
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        joins = [g.init_weight_group.remote("127.0.0.1", port, i + 1, 3, "gloo") for i, g in enumerate(gens)]
        group = WeightGroup("127.0.0.1", port, 0, 3, backend="gloo")  # this process = learner rank 0
        ray.get(joins)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        nbytes = sum(v.numel() * v.element_size() for v in state.values())
        params = sum(p.numel() for p in model.parameters())
        bucket = args.bucket_mb * 2**20
        plans = plan_buckets(state, bucket)
        copy_s, push_s, bc_s, warm_s = [], [], [], []
        dst = {k: torch.empty_like(v) for k, v in state.items()}
        for r in range(args.repeats + 1):
            t0 = time.perf_counter()
            copied = {k: v.clone() for k, v in state.items()}
            copy_s.append(time.perf_counter() - t0)
            del copied
            t0 = time.perf_counter()
            for k, v in state.items():
                dst[k].copy_(v)
            warm_s.append(time.perf_counter() - t0)
            for k, v in state.items():  # a new version each time
                if v.is_floating_point():
                    v.add_(1e-3)
            t0 = time.perf_counter()
            refs = put_buckets(state, bucket)
            versions = ray.get([g.update_weights.remote(2 * r + 1, refs) for g in gens])
            push_s.append(time.perf_counter() - t0)
            assert versions == [2 * r + 1] * 2
            del refs
            t0 = time.perf_counter()
            recv = [g.receive_weights.remote(2 * r + 2, plans) for g in gens]
            group.send(state, bucket)
            assert ray.get(recv) == [2 * r + 2] * 2
            bc_s.append(time.perf_counter() - t0)
            log.info("repeat %d: clone %.3f s, copy_ %.3f s, packed push %.3f s, gloo broadcast %.3f s",
                     r, copy_s[-1], warm_s[-1], push_s[-1], bc_s[-1])
        # the generators really hold the pushed weights
        probe = ray.get(gens[0].stats.remote())
        log.info("generator stats: %s", probe)
        ray.shutdown()
    med = statistics.median
    c, w, p, o = med(copy_s[1:]), med(warm_s[1:]), med(push_s[1:]), med(bc_s[1:])
    print(f"params={params / 1e6:.1f}M state={nbytes / 2**20:.0f} MiB buckets={args.bucket_mb} MiB generators=2 "
          f"(medians of {args.repeats} repeats)")
    print(f"clone {c:.3f} s | copy_ into warm memory {w:.3f} s | packed push to 2 generators {p:.3f} s "
          f"({nbytes / 2**30 / p:.2f} GiB/s, x{p / w:.2f} the warm copy) | gloo broadcast {o:.3f} s (x{o / c:.2f})")
    print(f"bench_weight_push ratio: {p / c:.2f}")


if __name__ == "__main__":
    main()
