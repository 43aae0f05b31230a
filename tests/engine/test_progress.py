"""Progress off a terminal (issue 12 item 8): a plain line at each logging boundary."""
import logging

from fastkd.engine.metrics import Progress


def test_plain_progress_lines_when_not_a_tty(caplog, monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    with caplog.at_level(logging.INFO, logger="fastkd"):
        bar = Progress(10, "epoch 1/2", enabled=True, initial=2)
        for step in range(3, 11):
            if step % 4 == 0 or step == 10:  # what the engine does at a logging boundary
                bar.update(0, loss=f"{1.0 / step:.4f}", lr="0.1")
            bar.update(1)
        bar.close()
        Progress(10, "epoch 2/2", enabled=False).update(1, loss="1")  # other ranks print nothing
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split("  (")[0] for line in lines] == [
        "epoch 1/2  step 4/10  loss 0.2500  lr 0.1",
        "epoch 1/2  step 8/10  loss 0.1250  lr 0.1",
        "epoch 1/2  step 10/10  loss 0.1000  lr 0.1",
    ]
