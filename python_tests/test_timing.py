"""diffusion_ext.timing (interleaved min-of-N with a report of the machine's load) and the demo's choice
of thread count, against scripted clocks and CPU counters: no assertion here is about real time."""
import pytest

from diffusion_ext import demo, timing


class Script:
    """A fake perf_counter: each callable advances it by the next of its scripted durations."""

    def __init__(self, durations: dict[str, list[float]]):
        self.now, self.durations, self.calls = 0.0, {k: list(v) for k, v in durations.items()}, []

    def clock(self):
        return self.now

    def fn(self, name):
        def call():
            self.calls.append(name)
            self.now += self.durations[name].pop(0)
        return call


def test_interleaved_alternates_the_order_and_takes_the_minimum(monkeypatch):
    # durations exact in binary, so that the differences of the clock are too; the first: warm-up
    s = Script({"eager": [8.0, 2.0, 5.0, 2.5, 2.25], "fused": [8.0, 1.0, 4.0, 1.125, 1.0625]})
    monkeypatch.setattr(timing.time, "perf_counter", s.clock)
    t = timing.interleaved({"eager": s.fn("eager"), "fused": s.fn("fused")}, reps=4, warmup=1)
    assert s.calls == ["eager", "fused",                                   # warm-up, not timed
                       "eager", "fused", "fused", "eager", "eager", "fused", "fused", "eager"]
    assert t.times == {"eager": [2.0, 5.0, 2.5, 2.25], "fused": [1.0, 4.0, 1.125, 1.0625]}
    assert t.min("eager") == 2.0 and t.min("fused") == 1.0
    assert t.spread("eager") == pytest.approx(2.5 / 2.0 - 1)              # median of 4: the upper middle
    assert t.spread("fused") == pytest.approx(1.125 / 1.0 - 1)
    with pytest.raises(ValueError, match="timing.interleaved: reps must be at least 1, got 0"):
        timing.interleaved({"a": s.fn("eager")}, reps=0)


def test_load_meter_counts_other_processes_cpu(monkeypatch):
    # 2 CPUs, 10 s: 1500 of 2000 jiffies busy = 1.5 cores, of which this process used 4 s / 10 s = 0.4
    jiffies = iter([(100, 1000), (1600, 3000)])
    own = iter([1.0, 5.0])
    clock = iter([0.0, 10.0])
    monkeypatch.setattr(timing, "_cpu_jiffies", lambda: next(jiffies))
    monkeypatch.setattr(timing, "_own_cpu_s", lambda: next(own))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(timing.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(timing, "load_average", lambda: 1.25)
    load = timing.LoadMeter().stop()
    assert load.others_cores == pytest.approx(1.1) and load.wall_s == 10.0 and load.busy
    assert load.describe() == "other processes kept 1.10 of 2 cores busy; 1-minute load average 1.25 before, " \
                              "1.25 after"


@pytest.mark.parametrize("others, load_before, busy", [
    (0.1, 2.0, False),   # the CPU counters decide where there are some
    (0.9, 0.0, True),
    (None, 1.5, True),   # else the load average: more than half of the CPUs
    (None, 0.5, False),
    (None, None, False),
])
def test_busy(others, load_before, busy):
    assert timing.MachineLoad(2, 1.0, others, load_before, load_before).busy is busy


def test_a_noisy_measurement_says_so():
    quiet = timing.MachineLoad(2, 1.0, 0.0, 0.1, 0.1)
    calm = timing.Timing({"a": [1.0, 1.1, 1.05]}, quiet)
    assert not calm.noisy and calm.describe().endswith("the machine was quiet")
    spread = timing.Timing({"a": [1.0, 1.5, 1.6]}, quiet)     # half the repetitions disturbed
    assert spread.noisy and "the machine was busy" in spread.describe() and "a 50%" in spread.describe()
    busy = timing.Timing({"a": [1.0, 1.0, 1.0]}, timing.MachineLoad(2, 1.0, 1.0, 2.0, 2.0))
    assert busy.noisy and "other processes kept 1.00 of 2 cores busy" in busy.describe()


@pytest.mark.parametrize("cpus, torch_threads, others, want", [
    (1, 1, 0.0, 1), (2, 2, 0.0, 2), (2, 2, 0.9, 1), (4, 4, 1.0, 3), (4, 4, 0.1, 4), (16, 8, 2.0, 8), (2, 2, None, 1)])
def test_demo_uses_every_core_only_when_the_others_are_idle(monkeypatch, cpus, torch_threads, others, want):
    """All cores when other processes keep less than a quarter core busy as the demo starts; else one fewer
    (at least 1); unknown load (no /proc/stat) counts as busy."""
    class Meter:
        def stop(self):
            return timing.MachineLoad(cpus, 0.5, others, None, None)

    monkeypatch.setattr(demo.os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    monkeypatch.setattr(demo.torch, "get_num_threads", lambda: torch_threads)
    monkeypatch.setattr(timing, "LoadMeter", Meter)
    monkeypatch.setattr(demo.time, "sleep", lambda s: None)
    assert demo.default_threads() == want
