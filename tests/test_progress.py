"""Progress reporting of long loops (correctnet.progress): the up-front estimate, a line a minute without a bar, the
console filter of the command line, and library bars off outside a terminal."""
import logging

import pytest
import torch

import correctnet as cn
from correctnet.training import TrainConfig, train
from correctnet.progress import CONSOLE, ConsoleFilter, ConsoleFormatter, Pace, bar_disabled, duration


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "correctnet"]


def run(caplog, step_s, total, *, bar, first_s=None, done=0):
    clock = Clock()
    pace = Pace("stage", total, done=done, bar=bar, clock=clock)
    with caplog.at_level(logging.INFO, logger="correctnet"):
        for i in range(total - done):
            clock.t += first_s if (i == 0 and first_s is not None) else step_s
            pace.update()
    return pace, lines(caplog)


def test_a_long_loop_gets_one_estimate_from_its_measured_first_steps(caplog):
    pace, out = run(caplog, 0.5, 1000, bar=True, first_s=30.0)  # the first step pays 30 s of one-off costs
    estimates = [m for m in out if "about" in m and "for 1000 steps" in m]
    assert len(estimates) == 1, out
    # 30 s + 999 x 0.5 s = 529.5 s: the rate leaves the first step out, the estimate counts it
    assert pace.estimate == pytest.approx(529.5)
    assert "about 9 min for 1000 steps (0.5 s per step" in estimates[0]
    assert len(out) == 1  # with a bar: no per-minute lines


def test_a_short_loop_says_nothing(caplog):
    pace, out = run(caplog, 0.01, 1000, bar=False)
    assert out == [] and pace.estimate == pytest.approx(10.0, rel=0.01)


def test_without_a_bar_a_line_a_minute_with_what_is_left(caplog):
    pace, out = run(caplog, 1.0, 300, bar=False)  # 300 s: an estimate, then a line at 60, 120, 180, 240 s
    minute = [m for m in out if "left" in m]
    assert len(minute) == 4, out
    assert minute[0].startswith("stage: 60/300 steps, about") and "4 min left" in minute[0]
    assert sum("for 300 steps" in m for m in out) == 1


def test_resumed_loops_count_from_where_they_were(caplog):
    pace, out = run(caplog, 1.0, 200, bar=True, done=150)
    assert pace.count == 200 and pace.estimate is not None and pace.estimate == pytest.approx(50.0)
    assert out == []  # 50 s left: not long


@pytest.mark.parametrize("seconds, text", [(5, "5 s"), (600, "10 min"), (3 * 3600, "3.0 h"),
                                           (1e9, "11574.1 days")])
def test_duration(seconds, text):
    assert duration(seconds) == text


def test_the_console_shows_marked_lines_warnings_and_errors_only():
    f, fmt = ConsoleFilter(), ConsoleFormatter()

    def record(level, console):
        r = logging.LogRecord("correctnet.training", level, __file__, 1, "msg %d", (1,), None)
        if console:
            r.__dict__.update(CONSOLE)
        return r

    assert not f.filter(record(logging.INFO, False)) and f.filter(record(logging.INFO, True))
    assert f.filter(record(logging.WARNING, False)) and f.filter(record(logging.ERROR, False))
    assert fmt.format(record(logging.INFO, True)) == "msg 1"
    assert fmt.format(record(logging.WARNING, False)) == "warning: msg 1"


def test_library_bars_are_off_outside_a_terminal(capsys):
    """The library's default (progress=None) lets tqdm draw only on a terminal: under pytest stderr is not one."""
    assert bar_disabled(None) is None and bar_disabled(True) is False and bar_disabled(False) is True
    torch.manual_seed(0)
    model = cn.analogize(torch.nn.Sequential(torch.nn.Linear(4, 3)), cn.LogNormal(0.5))
    data = (torch.randn(32, 4), torch.randint(0, 3, (32,)))
    cn.monte_carlo(model, data, n_chips=5)
    train(model, torch.utils.data.TensorDataset(*data), None, TrainConfig(epochs=1, batch_size=8))
    err = capsys.readouterr().err
    assert "chips" not in err and "it/s" not in err and "%|" not in err
    cn.monte_carlo(model, data, n_chips=5, progress=True)  # the control: asked for, the bar is drawn
    assert "chips" in capsys.readouterr().err
