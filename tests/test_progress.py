"""The text progress bar."""

import io

from mae_vit.progress import Progress, format_seconds


class FakeTty(io.StringIO):
    def isatty(self):
        return True


def test_draws_percentage_count_and_newline_when_enabled():
    out = io.StringIO()
    with Progress(4, "write", enabled=True, stream=out, min_interval=0, width=4) as bar:
        bar.update()
        bar.update(3, postfix="done")
    text = out.getvalue()
    assert "\rwrite:  25% |#---| 1/4 [" in text
    assert "\rwrite: 100% |####| 4/4 [" in text and text.rstrip("\n").endswith("done")
    assert text.endswith("\n") and text.count("\n") == 1


def test_silent_when_not_a_terminal_unless_forced():
    plain = io.StringIO()
    with Progress(3, "x", stream=plain, min_interval=0) as bar:
        bar.update(3)
    assert plain.getvalue() == ""
    tty = FakeTty()
    with Progress(3, "x", stream=tty, min_interval=0) as bar:
        bar.update(3)
    assert "3/3" in tty.getvalue()


def test_unknown_total_and_time_format():
    bar = Progress(None, "read", enabled=False, unit="samples")
    bar.update(5)
    line = bar.render(now=bar._start + 2.0)
    assert line.startswith("read: 5 [0:02, 2.5 samples/s]")
    assert format_seconds(75) == "1:15" and format_seconds(3725) == "1:02:05"
