"""The memory-vs-length plot reads AOT rows: the newest row per length, refusals kept apart."""

from __future__ import annotations

from cpmjax.parallel.aot_plot import plot_memory, series


def _row(seq_len: int, gib: float | None, sparse: bool = False, sweep: str = "s") -> dict:
    row = {"step": "train", "preset": "p", "topology": "v5p:2x2x1", "sparse": sparse,
           "seq_len": seq_len, "sweep": sweep, "hbm_gib": 95.74, "fits": gib is not None}
    if gib is not None:
        row["per_device_gib"] = {"arguments_plus_temporaries": gib}
    return row


def test_series_takes_the_newest_row_per_length_and_lists_refusals(tmp_path):
    rows = [_row(4096, 9.0), _row(4096, 2.0), _row(8192, 3.0), _row(16384, None),
            _row(8192, 7.0, sparse=True), _row(8192, 5.0, sweep="other")]
    assert series(rows, "train", "p", "v5p:2x2x1", False, "s") == ([4096, 8192], [2.0, 3.0],
                                                                   [16384])
    assert series(rows, "train", "p", "v5p:2x2x1", True, "s") == ([8192], [7.0], [])
    png = tmp_path / "m.png"
    plot_memory(rows, [dict(step="train", preset="p", topology="v5p:2x2x1", title="t")], png,
                tag="s")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
