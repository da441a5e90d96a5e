"""`mae push` (hub_push.py), offline: a tiny pretraining run and a tiny fine-tuning run, pushed to a stand-in for
huggingface_hub's HfApi that records its calls and keeps a copy of every uploaded folder.

Checked: the files sent in each format (ours, hf, timm) and that they load back with mae-torch, transformers and
timm to the run's weights; the model card (front matter, recipe, metrics equal to metrics.jsonl's, linked
pictures, the loading snippets of each format, the mae-torch one followed through a stubbed download); that a
token in HF_TOKEN reaches no file; --dry-run (files written, no Hub call); --private and --revision passed on;
Hub failures as one `mae: error:` line with exit status 2, from the real HfApi against local endpoints (a
closed port, a server answering 401/403/500), so no test needs the network.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import mae_torch
from mae_torch import hub_push
from mae_torch.cli import main
from mae_torch.config import ModelConfig
from mae_torch.models import DECODER, weights_file

TOKEN = "hf_FakeTokenForTests0123456789"  # recognisable: must appear in no uploaded file and no message
REPO = "me/mae-smoke"
CPU = ["--preset", "smoke", "--device", "cpu", "--num-workers", "0"]
PICTURES = {"curves.png", "reconstructions.png"}


def write_images(root: Path, per_class: int = 16) -> Path:
    """root/<class>/<i>.png: 16x16 noise with one bright channel per class (as tests/test_cli.py's images)."""
    rs = np.random.RandomState(0)
    for channel, name in ((2, "blue"), (0, "red")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            arr = rs.randint(0, 80, (16, 16, 3)).astype(np.uint8)
            arr[..., channel] = rs.randint(170, 256, (16, 16))
            Image.fromarray(arr).save(root / name / f"{i:02d}.png")
    return root


def mae(*args) -> int:
    return main([str(a) for a in args])


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mae: error: "), err
    return lines[0]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared CPU OpenMP's spin-waiting slows them down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory) -> Path:
    """Two epochs, so that the last and the best epoch may differ."""
    data = write_images(tmp_path_factory.mktemp("data"))
    run = tmp_path_factory.mktemp("runs") / "pretrain"
    assert mae("pretrain", *CPU, "--data", data, "--epochs", 2, "--out", run) == 0
    return run


@pytest.fixture(scope="module")
def finetune_run(tmp_path_factory, pretrain_run) -> Path:
    data = write_images(tmp_path_factory.mktemp("data"))
    run = tmp_path_factory.mktemp("runs") / "finetune"
    assert mae("finetune", *CPU, "--data", data, "--epochs", 1, "--pretrained", pretrain_run, "--out", run) == 0
    return run


class FakeHub:
    """Stands in for huggingface_hub.HfApi: records every call and copies each uploaded folder (one per commit)."""

    def __init__(self, root: Path, fail: Exception | None = None):
        self.root, self.fail, self.calls, self.commits = root, fail, [], []

    def api(self, *args, **kwargs) -> FakeHub:  # what hub_push calls as `HfApi(...)`
        self.calls.append(("HfApi", args, kwargs))
        return self

    def record(self, name: str, **kwargs) -> None:
        self.calls.append((name, (), kwargs))
        if self.fail is not None:
            raise self.fail

    def create_repo(self, repo_id: str, **kwargs) -> str:
        self.record("create_repo", repo_id=repo_id, **kwargs)
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id: str, **kwargs) -> None:
        self.record("create_branch", repo_id=repo_id, **kwargs)

    def upload_folder(self, *, folder_path, **kwargs) -> None:
        self.record("upload_folder", folder_path=folder_path, **kwargs)
        self.commits.append(self.root / f"commit{len(self.commits)}")
        shutil.copytree(folder_path, self.commits[-1])

    def named(self, name: str) -> list[dict]:
        return [kwargs for call, _, kwargs in self.calls if call == name]

    @property
    def uploaded(self) -> Path:
        assert len(self.commits) == 1, f"expected one commit, got {len(self.commits)}"
        return self.commits[0]


@pytest.fixture
def hub(monkeypatch, tmp_path) -> FakeHub:
    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(hub_push, "HfApi", fake.api)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return fake


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def card_parts(folder: Path) -> tuple[dict, str]:
    """(front matter, body) of the uploaded README.md."""
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n")
    head, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def table_row(body: str, label: str) -> dict[str, str]:
    """A row of the card's metrics table by its label ("last", "best"), keyed by the header's column names."""
    lines = body.splitlines()
    header = next(line for line in lines if line.startswith("| | epoch |"))
    row = next(line for line in lines if line.startswith(f"| {label} |"))
    cells = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]  # noqa: E731
    return dict(zip(cells(header)[1:], cells(row)[1:]))


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def run_state(run: Path, encoder_only: bool = False) -> dict[str, torch.Tensor]:
    state = load_file(str(weights_file(run)))  # the weights push sends: best, else last
    return {k: v for k, v in state.items() if not (encoder_only and k.startswith(DECODER))}


EXPECTED = {  # (run, format) -> the files sent
    ("pretrain", "ours"): {"model.safetensors", "model.json", *PICTURES},
    ("pretrain", "hf"): {"model.safetensors", "config.json", "preprocessor_config.json", *PICTURES},
    ("pretrain", "timm"): {"model.safetensors", "config.json", *PICTURES},
    ("finetune", "ours"): {"model.safetensors", "model.json", "curves.png"},
    ("finetune", "timm"): {"model.safetensors", "config.json", "curves.png"},
}


# ---------------------------------------------------------------- what is sent, per format


@pytest.mark.parametrize("kind, fmt", sorted(EXPECTED))
def test_push_sends_the_format_files_card_and_config_in_one_commit(kind, fmt, request, hub):
    run = request.getfixturevalue(f"{kind}_run")
    assert mae("push", run, REPO, "--format", fmt) == 0
    assert [c[0] for c in hub.calls] == ["HfApi", "create_repo", "upload_folder"]
    assert hub.calls[0][1:] == ((), {})  # no token handed over: huggingface_hub finds it itself
    assert hub.named("create_repo") == [dict(repo_id=REPO, private=None, exist_ok=True, repo_type="model")]
    (upload,) = hub.named("upload_folder")
    assert upload["repo_id"] == REPO and upload["revision"] is None
    sent = hub.uploaded
    assert files(sent) == EXPECTED[kind, fmt] | {"README.md", "config.yaml", "metrics.jsonl"}
    assert (sent / "config.yaml").read_bytes() == (run / "config.yaml").read_bytes()
    assert (sent / "metrics.jsonl").read_bytes() == (run / "metrics.jsonl").read_bytes()
    for name in files(sent):  # the token is in HF_TOKEN: it must reach no file
        assert TOKEN.encode() not in (sent / name).read_bytes(), name


def test_ours_is_the_runs_weights_file_and_loads_back(pretrain_run, hub):
    assert mae("push", pretrain_run, REPO) == 0
    sent = hub.uploaded
    assert (sent / "model.safetensors").read_bytes() == weights_file(pretrain_run).read_bytes()  # best.safetensors
    assert json.loads((sent / "model.json").read_text()) == json.loads((pretrain_run / "best.json").read_text())
    model = mae_torch.load_pretrained(sent)
    assert isinstance(model, mae_torch.MaskedAutoencoder)
    same_state(model.state_dict(), run_state(pretrain_run))


def test_hf_format_loads_in_transformers_and_back(pretrain_run, hub):
    transformers = pytest.importorskip("transformers")
    assert mae("push", pretrain_run, REPO, "--format", "hf") == 0
    theirs, info = transformers.ViTMAEForPreTraining.from_pretrained(hub.uploaded, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    state = run_state(pretrain_run)
    assert torch.equal(theirs.vit.embeddings.cls_token.detach(), state["cls_token"])
    same_state(mae_torch.load_pretrained(hub.uploaded).state_dict(), state)  # the round trip is exact


def test_hf_format_of_a_classifier_is_converts_one_line_error(finetune_run, hub, tmp_path, capsys):
    assert mae("push", finetune_run, REPO, "--format", "hf") == 2
    assert "no classifier head" in one_error_line(capsys.readouterr().err)
    assert hub.calls == []  # staging fails before any repository is created
    assert mae("push", finetune_run, REPO, "--format", "hf", "--dry-run", tmp_path / "dry") == 2
    assert not (tmp_path / "dry").exists()


@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_timm_format_loads_in_timm_with_the_same_outputs(kind, request, hub):
    run = request.getfixturevalue(f"{kind}_run")
    assert mae("push", run, REPO, "--format", "timm") == 0
    sent = hub.uploaded
    config = json.loads((sent / "config.json").read_text())
    m = ModelConfig(**json.loads((run / "model.json").read_text())["model"])
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, m.img_size, m.img_size] and cfg["crop_pct"] == m.crop_pct
    assert cfg["mean"] == list(m.mean) and cfg["std"] == list(m.std)
    assert config["num_classes"] == (2 if kind == "finetune" else 0)
    assert config["global_pool"] == ("avg" if kind == "finetune" else "token")
    assert config.get("label_names") == (["blue", "red"] if kind == "finetune" else None)
    theirs = timm.create_model(f"local-dir:{sent}", pretrained=True).eval()  # what "hf-hub:ORG/NAME" reads too
    ours = mae_torch.load_pretrained(sent).eval()  # the encoder (or classifier) as our ViT
    same_state(ours.state_dict(), run_state(run, encoder_only=True))
    x = torch.randn(2, 3, m.img_size, m.img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = (theirs(x), ours(x)) if kind == "finetune" else (theirs.forward_features(x), ours.forward_features(x))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_timm_architecture_names_timms_shapes_else_a_stand_in():
    assert hub_push.timm_architecture(ModelConfig()) == "vit_base_patch16_224"
    assert hub_push.timm_architecture(ModelConfig(embed_dim=192, num_heads=3)) == "vit_tiny_patch16_224"
    assert hub_push.timm_architecture(ModelConfig(embed_dim=1024, depth=24, num_heads=16)) == "vit_large_patch16_224"
    tiny = ModelConfig(img_size=32, patch_size=2, embed_dim=192, num_heads=3)  # CIFAR's ViT-T/2: no timm name
    assert hub_push.timm_architecture(tiny) == hub_push.TIMM_FALLBACK


# ---------------------------------------------------------------- the model card


@pytest.mark.parametrize("kind, fmt", sorted(EXPECTED))
def test_model_card(kind, fmt, request, hub):
    run = request.getfixturevalue(f"{kind}_run")
    assert mae("push", run, REPO, "--format", fmt) == 0
    meta, body = card_parts(hub.uploaded)
    assert meta["library_name"] == "mae-torch" and meta.get("license", "other") == "other"
    assert {"mae", "masked-autoencoder", "vision-transformer"} <= set(meta["tags"])
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert f"command: {kind}" in body and f"embed_dim: {cfg['model']['embed_dim']}" in body  # the recipe
    assert f"epochs: {cfg['train']['epochs']}" in body and str(cfg["run"]["data"]) not in body  # no local path
    rows = metrics(run)
    best = [r for r in rows if r["best"]][-1]
    for label, row in (("last", rows[-1]), ("best", best)):  # the numbers of metrics.jsonl, to 4 decimals
        cells = table_row(body, label)
        assert cells["epoch"] == str(row["epoch"])
        for key in ("train_loss", "val_loss", "val_acc"):
            assert cells.get(key) == (f"{row[key]:.4f}" if key in row else None), (label, key)
    assert f"epoch {best['epoch']} (the run's best.safetensors)" in body
    linked = set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", body))
    assert linked == files(hub.uploaded) & PICTURES and linked  # every picture sent is shown, none missing
    assert f'mae_torch.load_pretrained("hf-hub:{REPO}")' in body
    assert (f'ViTMAEForPreTraining.from_pretrained("{REPO}")' in body) == (fmt == "hf")
    assert (f'timm.create_model("hf-hub:{REPO}", pretrained=True)' in body) == (fmt == "timm")
    assert TOKEN not in body


def test_cards_mae_torch_snippet_loads_the_pushed_weights(pretrain_run, hub, monkeypatch):
    """The card's `load_pretrained("hf-hub:...")`, with huggingface_hub's download answered by the uploaded
    folder: the reference resolves to the repository and loads the run's weights."""
    assert mae("push", pretrain_run, REPO, "--revision", "v1") == 0
    body = card_parts(hub.uploaded)[1]
    ref = re.search(r'load_pretrained\("(hf-hub:[^"]+)"\)', body)[1]
    assert ref == f"hf-hub:{REPO}@v1"
    asked = []

    def snapshot_download(repo_id, revision=None, **kwargs):
        asked.append((repo_id, revision))
        return str(hub.uploaded)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    same_state(mae_torch.load_pretrained(ref).state_dict(), run_state(pretrain_run))
    assert asked and set(asked) == {(REPO, "v1")}


# ---------------------------------------------------------------- options


def test_private_and_revision_are_passed_on(pretrain_run, hub, capsys):
    assert mae("push", pretrain_run, REPO, "--private", "--revision", "dev") == 0
    assert [c[0] for c in hub.calls] == ["HfApi", "create_repo", "create_branch", "upload_folder"]
    assert hub.named("create_repo")[0]["private"] is True
    assert hub.named("create_branch") == [dict(repo_id=REPO, branch="dev", exist_ok=True, repo_type="model")]
    assert hub.named("upload_folder")[0]["revision"] == "dev"
    assert f"https://huggingface.co/{REPO}/tree/dev" in capsys.readouterr().out


def test_dry_run_writes_the_files_and_calls_no_hub(pretrain_run, hub, tmp_path, capsys):
    out = tmp_path / "review"
    assert mae("push", pretrain_run, REPO, "--format", "timm", "--dry-run", out) == 0
    assert hub.calls == []
    assert files(out) == EXPECTED["pretrain", "timm"] | {"README.md", "config.yaml", "metrics.jsonl"}
    assert "uploaded nothing" in capsys.readouterr().out
    assert 'timm.create_model("hf-hub:me/mae-smoke", pretrained=True)' in (out / "README.md").read_text()
    assert mae("push", pretrain_run, REPO, "--dry-run", out) == 2  # not empty: never mixed with other files
    assert "not an empty folder" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    "run, repo, message",
    [
        ("empty", REPO, "not a mae-torch run directory"),
        ("run", "no-namespace", "write ORG/NAME"),
        ("run", "me/bad name", "write ORG/NAME"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(run, repo, message, pretrain_run, hub, tmp_path, capsys):
    assert mae("push", pretrain_run if run == "run" else tmp_path, repo) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert hub.calls == []


# ---------------------------------------------------------------- Hub failures, with the real HfApi


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def endpoint(monkeypatch):
    """Point the real HfApi at a local address: `endpoint(None)` a closed port (no network), `endpoint(401)` a
    server answering every request with that status."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    servers = []

    def start(status: int | None) -> None:
        if status is None:
            monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
            return

        class Answer(BaseHTTPRequestHandler):
            def answer(self) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"error": "refused"}')

            do_GET = do_POST = do_PUT = answer

            def log_message(self, *args) -> None:  # keep the test output clean
                pass

        server = HTTPServer(("127.0.0.1", 0), Answer)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "status, says",
    [
        (None, "no network: use --dry-run DIR to write the files locally"),
        (401, "log in with `hf auth login` or set HF_TOKEN"),
        (403, "write token"),
        (500, "the Hub refused the upload"),
    ],
)
def test_hub_failures_are_one_line_errors(status, says, pretrain_run, endpoint, capsys):
    endpoint(status)
    assert mae("push", pretrain_run, REPO) == 2
    err = capsys.readouterr().err
    assert says in one_error_line(err) and TOKEN not in err


def test_a_token_in_a_hub_message_is_scrubbed(pretrain_run, monkeypatch, tmp_path, capsys):
    fake = FakeHub(tmp_path, fail=ConnectionError(f"proxy said: bad header Authorization: Bearer {TOKEN}"))
    monkeypatch.setattr(hub_push, "HfApi", fake.api)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert mae("push", pretrain_run, REPO) == 2
    err = capsys.readouterr().err
    assert "no network" in one_error_line(err) and TOKEN not in err


def test_other_exceptions_keep_their_traceback(pretrain_run, monkeypatch, tmp_path):
    fake = FakeHub(tmp_path, fail=KeyError("a bug, not a Hub failure"))
    monkeypatch.setattr(hub_push, "HfApi", fake.api)
    with pytest.raises(KeyError):
        mae("push", pretrain_run, REPO)
