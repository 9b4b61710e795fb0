"""models.inference: several batches at once on a CPU, in order, memory bounded, torch's threads given back;
and forward_batches' outputs agree across core counts to float rounding and repeat bit for bit."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from cellmorph.models.inference import MAX_WORKERS, map_batches, plan_workers


def test_plan_gives_one_batch_per_core_on_cpu_and_one_at_a_time_elsewhere():
    assert plan_workers(torch.device("cpu"), 2) == (2, 1)
    assert plan_workers(torch.device("cpu"), 32) == (MAX_WORKERS, 4)
    assert plan_workers(torch.device("cpu"), 1) == (1, 1)
    assert plan_workers(torch.device("cuda"), 16) == (1, 16)


def test_map_batches_keeps_order_runs_at_once_and_restores_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    drawn, names = [], set()

    def items():
        for k in range(12):
            drawn.append(k)
            yield k

    def slow(k):  # later items finish first: the output must still be in input order
        names.add(threading.current_thread().name)
        time.sleep(0.02 * (12 - k) / 12)
        assert torch.get_num_threads() == 1
        return k * k

    out = []
    for r in map_batches(slow, items(), torch.device("cpu")):
        out.append(r)
        assert len(drawn) <= len(out) + 4  # at most 2 x workers drawn ahead: bounded memory
    assert out == [k * k for k in range(12)]
    assert len(names) == 2 and all(n.startswith("cellmorph-infer") for n in names)
    assert torch.get_num_threads() == 2
    torch.set_num_threads(before)


def test_map_batches_raises_the_items_error_and_gives_threads_back():
    before = torch.get_num_threads()

    def bad(k):
        if k == 3:
            raise ValueError("item 3")
        return k

    with pytest.raises(ValueError, match="item 3"):
        list(map_batches(bad, range(10), torch.device("cpu")))
    assert torch.get_num_threads() == before


def test_forward_batches_agree_across_thread_counts_and_repeat_bit_for_bit(subset_table):
    from cellmorph.data.store import build_store
    from cellmorph.models.factory import create_model, normalization
    from cellmorph.models.train import InputSpec, fold_batch_norm, forward_batches

    net = fold_batch_norm(create_model("tf_efficientnet_lite0", "imagenet", num_classes=0, in_chans=3))
    spec = InputSpec(224, *normalization(net))
    images = torch.from_numpy(build_store(subset_table.subset(range(24)) if hasattr(subset_table, "subset") else
                                          type(subset_table)(subset_table.df.iloc[:24], name="s24", label=subset_table.label, source="t"), 0).images)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = forward_batches(net, images, spec, torch.device("cpu"), 8)
        again = forward_batches(net, images, spec, torch.device("cpu"), 8)
        torch.set_num_threads(1)
        one = forward_batches(net, images, spec, torch.device("cpu"), 24)
    finally:
        torch.set_num_threads(before)
    assert two.shape == (24, 1280) and torch.equal(two, again)  # same cores, same cut: the same bits
    assert torch.allclose(one, two, rtol=1e-4, atol=1e-5)  # other cuts: float rounding only
