"""Checkpoints by URL (``model.checkpoint: https://…``), against a server on the loopback
interface: downloaded once into the cache, then reused offline; failures are one line."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import timm
import torch
from models_testlib import VIT, model_cfg

from caat_peft.errors import UserError
from caat_peft.models import build_backbone
from caat_peft.models.download import checkpoint_cache, fetch


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep the test output clean
        pass


@pytest.fixture
def server(tmp_path) -> Iterator[tuple[str, Path, list[str]]]:
    """(base URL, served folder, request paths seen), on 127.0.0.1 with a free port."""
    folder = tmp_path / "served"
    folder.mkdir()
    seen: list[str] = []

    class Handler(_Quiet):
        def do_GET(self) -> None:
            seen.append(self.path)
            super().do_GET()

    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(folder))
    )
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", folder, seen
    finally:
        httpd.shutdown()
        httpd.server_close()


def _ares_style_file(folder: Path, name: str = "vit_small_AT.pth", seed: int = 0) -> dict:
    torch.manual_seed(seed)
    state = timm.create_model("vit_small_patch16_224", num_classes=1000, **VIT).state_dict()
    torch.save(state, folder / name)
    return state


def test_a_checkpoint_url_is_downloaded_once_and_then_works_offline(server):
    base, folder, seen = server
    state = _ares_style_file(folder)
    url = f"{base}/vit_small_AT.pth"
    model = build_backbone(model_cfg("ares_vit_small", VIT, url), 5)
    torch.testing.assert_close(model.state_dict()["blocks.0.attn.qkv.weight"],
                               state["blocks.0.attn.qkv.weight"])  # fmt: skip
    assert seen == ["/vit_small_AT.pth"]
    cached = fetch(url, progress=False)
    assert cached.is_file() and checkpoint_cache() in cached.parents
    assert not list(cached.parent.glob(".*partial"))  # no partial file left
    (folder / "vit_small_AT.pth").unlink()  # the source is gone: the cache serves
    build_backbone(model_cfg("ares_vit_small", VIT, url), 5)
    assert seen == ["/vit_small_AT.pth"]


def test_two_sources_with_the_same_file_name_do_not_share_a_cache_entry(server):
    base, folder, _ = server
    (folder / "a").mkdir()
    (folder / "b").mkdir()
    first = _ares_style_file(folder / "a", "model.pth", seed=1)
    second = _ares_style_file(folder / "b", "model.pth", seed=2)
    a = build_backbone(model_cfg("ares_vit_small", VIT, f"{base}/a/model.pth"), 5)
    b = build_backbone(model_cfg("ares_vit_small", VIT, f"{base}/b/model.pth"), 5)
    key = "blocks.0.attn.qkv.weight"
    assert torch.equal(a.state_dict()[key], first[key])
    assert torch.equal(b.state_dict()[key], second[key])


def test_a_missing_url_is_one_line_and_leaves_nothing_in_the_cache(server):
    base, _, _ = server
    url = f"{base}/no_such_file.pth"
    with pytest.raises(UserError, match="could not download") as exc:
        fetch(url, progress=False)
    message = str(exc.value)
    assert url in message and "model.checkpoint" in message and "\n" not in message
    assert not [p for p in checkpoint_cache().rglob("*") if p.is_file()]


def test_a_registry_entry_with_a_url_downloads_on_pretrained(server, monkeypatch):
    """``model.pretrained: true`` on an entry with a direct URL (as the ARES entries have)."""
    import dataclasses

    from caat_peft.models import registry

    base, folder, seen = server
    state = _ares_style_file(folder, "entry.pth", seed=3)
    original = registry.get_spec("ares_vit_small")
    assert original.url and original.url.startswith("https://")  # the real entry has one
    spec = dataclasses.replace(original, url=f"{base}/entry.pth")
    monkeypatch.setitem(registry.REGISTRY, spec.name, spec)
    model = build_backbone(model_cfg("ares_vit_small", VIT, pretrained=True), 5)
    key = "blocks.1.mlp.fc1.weight"
    assert torch.equal(model.state_dict()[key], state[key]) and seen == ["/entry.pth"]
