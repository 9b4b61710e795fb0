"""models.inference: several parts at once on a CPU, in order, memory bounded, torch's threads given back;
and forward_batches' outputs are the same bits on any number of cores and for any batch size."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from cellmorph.models.inference import CPU_PART, MAX_WORKERS, map_batches, part_size, plan_workers


def test_plan_gives_one_part_per_core_on_one_thread_on_cpu_and_whole_batches_elsewhere():
    assert plan_workers(torch.device("cpu"), 2) == (2, 1)
    assert plan_workers(torch.device("cpu"), 32) == (32, 1)
    assert plan_workers(torch.device("cpu"), 1000) == (MAX_WORKERS, 1)  # never more than one thread per part
    assert plan_workers(torch.device("cpu"), 1) == (1, 1)
    assert plan_workers(torch.device("cuda"), 16) == (1, 16)
    assert part_size(torch.device("cpu"), 256) == part_size(torch.device("cpu"), 3) == CPU_PART
    assert part_size(torch.device("cuda"), 256) == 256


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


def test_forward_batches_same_bits_on_any_core_count_and_batch_size(subset_table):
    from cellmorph.data.store import build_store
    from cellmorph.models.factory import create_model, normalization
    from cellmorph.models.train import InputSpec, fold_batch_norm, forward_batches

    net = fold_batch_norm(create_model("tf_efficientnet_lite0", "imagenet", num_classes=0, in_chans=3))
    spec = InputSpec(224, *normalization(net))
    table = type(subset_table)(subset_table.df.iloc[:20], name="s20", label=subset_table.label, source="t")
    images = torch.from_numpy(build_store(table, 0).images)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = forward_batches(net, images, spec, torch.device("cpu"), 32)
        torch.set_num_threads(1)
        one = forward_batches(net, images, spec, torch.device("cpu"), 7)
        with torch.inference_mode():  # the plain network on all 20 at once, 2 threads: other sums, same values
            torch.set_num_threads(2)
            x = spec(images.float().div_(255)).contiguous(memory_format=torch.channels_last)
            whole = net.to(memory_format=torch.channels_last)(x)
    finally:
        torch.set_num_threads(before)
    assert two.shape == (20, 1280)
    assert torch.equal(one, two)  # 1 or 2 cores, batch 7 or 32: the same bits
    assert torch.allclose(whole, two, rtol=1e-4, atol=1e-5)  # and the network's own numbers to float rounding
