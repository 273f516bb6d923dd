"""matcaps.figures: PNGs written atomically, figures closed whether or not the write succeeds."""

from __future__ import annotations

import pytest

from matcaps.figures import pyplot, save_and_close

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _figure():
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(2, 2))
    axes.plot([0, 1], [1, 0])
    return plt, figure


def test_writes_a_png_into_a_new_folder_and_closes_the_figure(tmp_path):
    plt, figure = _figure()
    path = save_and_close(figure, tmp_path / "new" / "folder" / "curve.png", dpi=50)
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    assert figure.number not in plt.get_fignums()
    assert [p.name for p in path.parent.iterdir()] == ["curve.png"]  # no temporary file left beside it


def test_a_failed_drawing_keeps_the_old_file_and_still_closes_the_figure(tmp_path, monkeypatch):
    plt, figure = _figure()
    path = tmp_path / "curve.png"
    path.write_bytes(b"the previous picture")

    def broken_savefig(*args, **kwargs):
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(figure, "savefig", broken_savefig)
    with pytest.raises(RuntimeError, match="drawing failed"):
        save_and_close(figure, path, dpi=50)
    assert path.read_bytes() == b"the previous picture"
    assert figure.number not in plt.get_fignums()
    assert [p.name for p in tmp_path.iterdir()] == ["curve.png"]


def test_an_unwritable_place_raises_and_still_closes_the_figure(tmp_path):
    plt, figure = _figure()
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(OSError):
        save_and_close(figure, blocker / "curve.png", dpi=50)
    assert figure.number not in plt.get_fignums()
    assert blocker.read_text() == "a file where a folder should be"
