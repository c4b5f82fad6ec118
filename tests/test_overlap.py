"""The threads that overlap a job's stages: order, bounded look-ahead, failures, early stops."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from musetalk_worker.overlap import BackgroundConsumer, Prefetcher
from musetalk_worker.timing import StageTimer


def test_prefetch_keeps_order_and_runs_at_most_depth_items_ahead():
    produced = []

    def items():
        for i in range(20):
            produced.append(i)
            yield i

    seen = []
    with Prefetcher(items(), depth=2) as prefetched:
        for item in prefetched:
            time.sleep(0.01)
            # The consumer holds one item, the queue at most two, the producer one in hand.
            assert len(produced) - len(seen) <= 4
            seen.append(item)
    assert seen == list(range(20))


def test_prefetch_runs_the_iterator_on_another_thread():
    threads = []

    def items():
        threads.append(threading.current_thread())
        yield 1

    with Prefetcher(items()) as prefetched:
        assert list(prefetched) == [1]
    assert threads and threads[0] is not threading.current_thread()


def test_a_failure_in_the_iterator_reaches_the_consumer_after_the_items_before_it():
    def items():
        yield 1
        yield 2
        raise ValueError("bad frame 3")

    seen = []
    with pytest.raises(ValueError, match="bad frame 3"):
        with Prefetcher(items()) as prefetched:
            for item in prefetched:
                seen.append(item)
    assert seen == [1, 2]


def test_stopping_early_closes_the_iterator_and_ends_the_thread():
    closed = threading.Event()

    def endless():
        try:
            while True:
                yield 0
        finally:
            closed.set()

    with pytest.raises(RuntimeError):
        with Prefetcher(endless(), depth=1) as prefetched:
            for _ in prefetched:
                raise RuntimeError("the consumer failed")
    assert closed.wait(5), "the producer's iterator was not closed"
    assert not prefetched._thread.is_alive()


def test_the_consumer_keeps_order_on_its_own_thread():
    seen, threads = [], set()

    def consume(a, b):
        threads.add(threading.current_thread())
        seen.append((a, b))

    with BackgroundConsumer(consume, depth=1) as consumer:
        for i in range(10):
            consumer.put(i, -i)
    assert seen == [(i, -i) for i in range(10)]
    assert threading.current_thread() not in threads


def test_a_consumer_failure_is_raised_in_the_producer_and_later_items_are_dropped():
    seen = []

    def consume(i):
        if i == 3:
            raise OSError("disk full")
        seen.append(i)

    with pytest.raises(OSError, match="disk full"):
        with BackgroundConsumer(consume, depth=1) as consumer:
            for i in range(50):
                consumer.put(i)
    assert seen == [0, 1, 2]


def test_the_stage_timer_adds_up_host_stages_of_several_threads_and_device_stages():
    timer = StageTimer(torch.device("cpu"))

    def work():
        for _ in range(200):
            with timer("read"):
                pass

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with timer.device("unet"):
        time.sleep(0.05)
    totals = timer.totals()
    assert set(totals) == {"read", "unet"}
    assert 0.05 <= totals["unet"] < 1.0
    assert list(timer.timed_iter("decode", iter([1, 2]))) == [1, 2] and "decode" in timer.seconds
