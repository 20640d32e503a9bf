"""Data-parallel evaluation on the drop-in, as OpenFlamingo's evaluate.py runs it. Launched by
test_openflamingo_eval.py::test_torchrun_data_parallel_evaluation_equals_one_process:

    torchrun --standalone --nproc_per_node 2 tests/torchrun_eval.py      (gloo, CPU, loopback)

Every rank builds the same tiny OpenFlamingo model and its drop-in, wraps the drop-in in DistributedDataParallel (CPU
form, no device_ids: EvalModel.init_distributed), shards the query set with a DistributedSampler as
utils.prepare_eval_samples does, and per batch makes EvalModel's calls
(flamingo_fast.profiling.baselines.EvalModelCalls: get_outputs with beams, get_rank_classifications through the
per-class loop on `DDP(...)` itself) and `score` through `DDP(...).module`; the predictions are gathered with
all_gather_object and merged by query id, as evaluate.py does. Rank 0 then runs the same evaluation in one process
without DDP and checks that every query's results agree: tokens equal, log-likelihoods within the float32 tolerance.
Prints "torchrun_eval: OK"."""

from __future__ import annotations

import os
import sys

import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from flamingo_fast.compat import import_torchvision  # noqa: E402

import_torchvision()  # before open_clip imports it (as conftest.py does)

import torch.distributed as dist  # noqa: E402
from helpers import TOLERANCE  # noqa: E402
from openflamingo_models import EOC, MEDIA, PAD, build_openflamingo  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

import flamingo_fast  # noqa: E402
from flamingo_fast.profiling.baselines import EvalModelCalls  # noqa: E402

QUERIES, BATCH = 5, 2  # an odd count: the sampler pads the last rank's shard with a repeated query
CLASSES = [[11, 12], [13], [11, 14, 15]]


def query(index: int) -> dict:
    """One query: a 1-shot context then `<image>` and a question, of its own length; its two images."""
    g = torch.Generator().manual_seed(1000 + index)
    shot = [MEDIA] + torch.randint(3, EOC, (3 + index % 3,), generator=g).tolist() + [EOC]
    question = [MEDIA] + torch.randint(3, EOC, (2 + index % 2,), generator=g).tolist()
    return {"id": index, "ids": shot + question, "vision": torch.randn(2, 1, 3, 32, 32, generator=g)}


def collate(items: list[dict]) -> dict:
    """Left-padded ids and mask (the tokenizer's padding_side="left"), stacked images."""
    longest = max(len(item["ids"]) for item in items)
    ids = torch.tensor([[PAD] * (longest - len(item["ids"])) + item["ids"] for item in items])
    mask = torch.tensor([[0] * (longest - len(item["ids"])) + [1] * len(item["ids"]) for item in items]).bool()
    return {"id": [item["id"] for item in items], "ids": ids, "mask": mask,
            "vision": torch.stack([item["vision"] for item in items])}


def evaluate(model, loader) -> dict:
    """EvalModel's calls per batch -> {query id: (caption tokens, cached loop, uncached loop, score)}."""
    calls = EvalModelCalls(model)
    drop_in = model.module if isinstance(model, DistributedDataParallel) else model
    predictions = {}
    for batch in loader:
        vision, ids, mask = batch["vision"], batch["ids"], batch["mask"]
        captions = calls.get_outputs(vision, ids, mask, 0, 6, 3, -2.0)
        cached = calls.get_rank_classifications(vision, ids, mask, CLASSES, True, False)
        uncached = calls.get_rank_classifications(vision, ids, mask, CLASSES, False, False)
        score = drop_in.score(vision, ids, mask, candidates=CLASSES)
        for row, index in enumerate(batch["id"]):
            predictions[index] = (captions[row].tolist(), cached[row], uncached[row], score[row])
    return predictions


def build():
    return flamingo_fast.from_openflamingo(build_openflamingo("llama", 2, seed=5), backend="torch",
                                           max_batch_size=BATCH, max_seq_len=64)


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    queries = [query(i) for i in range(QUERIES)]
    model = DistributedDataParallel(build())  # CPU form: no device_ids
    loader = DataLoader(queries, batch_size=BATCH, sampler=DistributedSampler(queries), collate_fn=collate)
    predictions = evaluate(model, loader)
    gathered = [None] * world
    dist.all_gather_object(gathered, predictions)
    if rank == 0:
        merged = {k: v for shard in gathered for k, v in shard.items()}
        assert sorted(merged) == list(range(QUERIES)), sorted(merged)
        alone = evaluate(build(), DataLoader(queries, batch_size=BATCH, collate_fn=collate))
        tol = TOLERANCE[torch.float32]
        for index in range(QUERIES):
            got, want = merged[index], alone[index]
            assert got[0] == want[0], f"query {index}: caption tokens {got[0]} != {want[0]}"
            for name, a, b in zip(("cached loop", "uncached loop", "score"), got[1:], want[1:], strict=True):
                torch.testing.assert_close(a, b, atol=tol["atol"], rtol=tol["rtol"], msg=f"query {index}: {name}")
            torch.testing.assert_close(got[1], want[2], atol=tol["atol"], rtol=tol["rtol"])  # cached == uncached
        print(f"torchrun_eval: OK ({world} ranks, {QUERIES} queries)", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
