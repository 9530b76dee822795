"""The model card (offline: its front matter, base model, licence, prompts, images, settings, and no secret), the
HF_TOKEN rules (environment only, checked before Ray starts), an upload that fails against a real local HTTP
server (the LoRA and the card stay, one warning says what failed and how to retry, exit status 4) and one that
succeeds against a local server speaking the Hub's API."""

import base64
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from PIL import Image

from raytune_sd3.config import ConfigError, dump_job, load_job
from raytune_sd3.driver.preflight import check_paths
from raytune_sd3.hub.publish import base_model_licence, front_matter, write_model_card

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_" + "Zx9" * 12  # the shape of a Hugging Face token (never a real one)
URL_SECRET = "s3cr3t-in-a-url"
LARGE = "stabilityai/stable-diffusion-3.5-large"


def _job(tmp_path: Path, *overrides: str):
    return load_job(ROOT / "jobs" / "tiny.yaml", [
        f"output_dir={tmp_path / 'out'}", f"model.pretrained={LARGE}", "hub.repo_id=me/fox-lora",
        f"data.datasets.0.instance_data_dir={tmp_path / 'demo'}",
        "data.datasets.0.caption_strategy=instanceprompt", 'data.datasets.0.instance_prompt=a photo of "sks" fox',
        f"data.cache_dir=s3://user:{URL_SECRET}@bucket/cache",  # URL credentials in a config value
        f"validation.prompts=['sks fox in the snow', 'sks fox, token {TOKEN}']", *overrides])


def _validation(out: Path, step: int, colour: tuple) -> list[bytes]:
    folder = out / "validation" / f"step_{step:06d}"
    folder.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (64, 64), colour).save(folder / f"{i:02d}_64x64.png")
    return [(folder / f"{i:02d}_64x64.png").read_bytes() for i in range(2)]


def test_the_card_names_the_base_model_prompts_and_images_and_holds_no_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    cfg = _job(tmp_path)
    out = cfg.output_dir
    _validation(out, 20, (255, 0, 0))
    last = _validation(out, 40, (0, 0, 255))
    card = write_model_card(cfg, out, steps=40)
    text = card.read_text()

    meta = front_matter(text)
    assert meta["base_model"] == LARGE and meta["library_name"] == "diffusers"
    assert (meta["license"], meta["license_name"]) == ("other", "stabilityai-ai-community")
    assert meta["license_link"] == f"https://huggingface.co/{LARGE}/blob/main/LICENSE.md"
    assert {"lora", "sd3.5", "text-to-image"} <= set(meta["tags"])
    assert meta["instance_prompt"] == 'a photo of "sks" fox' and '**Trigger:** `a photo of "sks" fox`' in text
    # the widget and the body link the last validation step's images, copied beside the card
    assert [w["output"]["url"] for w in meta["widget"]] == ["images/00_64x64.png", "images/01_64x64.png"]
    assert meta["widget"][0]["text"] == "sks fox in the snow"
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links == ["images/00_64x64.png", "images/01_64x64.png"]
    assert [(out / link).read_bytes() for link in links] == last
    # how to load it, and the licence line
    assert f'StableDiffusion3Pipeline.from_pretrained("{LARGE}"' in text
    assert 'pipe.load_lora_weights("me/fox-lora")' in text
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    compile(code, "the card's example", "exec")  # valid Python, the quoted trigger included
    assert 'pipe("a photo of \\"sks\\" fox"' in code
    assert "The base model's licence applies: [stabilityai-ai-community]" in text
    # the settings are the job itself (it loads as one), secrets stripped
    settings = yaml.safe_load(text.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert settings["train"]["learning_rate"] == cfg.train.learning_rate and settings["hub"]["private"] is True
    assert TOKEN not in text and URL_SECRET not in text and "<redacted>" in text
    assert not any(TOKEN.encode() in p.read_bytes() for p in out.rglob("*") if p.is_file() and "validation" not in
                   p.parts)

    # a later card shows the newer images only
    (out / "validation" / "step_000060").mkdir()
    Image.new("RGB", (64, 64), (0, 255, 0)).save(out / "validation" / "step_000060" / "00_64x64.png")
    write_model_card(cfg, out, steps=60)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["00_64x64.png"]


def test_huggingface_hub_reads_the_cards_metadata_as_we_wrote_it(tmp_path):
    """The README.md loaded back with huggingface_hub's ModelCard (as the Hub parses it): every key and value."""
    from huggingface_hub import ModelCard

    cfg = _job(tmp_path)
    _validation(cfg.output_dir, 40, (0, 0, 255))
    card = ModelCard.load(write_model_card(cfg, cfg.output_dir, steps=40))
    assert card.data.to_dict() == {
        "base_model": LARGE, "library_name": "diffusers", "pipeline_tag": "text-to-image",
        "license": "other", "license_name": "stabilityai-ai-community",
        "license_link": f"https://huggingface.co/{LARGE}/blob/main/LICENSE.md",
        "tags": ["text-to-image", "diffusers", "lora", "sd3", "sd3.5", "sd3.5-diffusers", "template:sd-lora",
                 "raytune_sd3"],
        "instance_prompt": 'a photo of "sks" fox',
        "widget": [{"text": "sks fox in the snow", "output": {"url": "images/00_64x64.png"}},
                   {"text": "sks fox, token <redacted>", "output": {"url": "images/01_64x64.png"}}]}
    assert card.text.startswith("\n# me/fox-lora\n")
    # a tiny base: not a hub model, so no base_model and no licence claimed; no images, no widget
    tiny = _job(tmp_path / "tiny", "model.pretrained=tiny-sd3", "hub.trigger=shapez")
    meta = ModelCard.load(write_model_card(tiny, tiny.output_dir)).data.to_dict()
    assert meta == {"library_name": "diffusers", "pipeline_tag": "text-to-image", "instance_prompt": "shapez",
                    "tags": ["text-to-image", "diffusers", "lora", "sd3", "sd3-diffusers", "template:sd-lora",
                             "raytune_sd3"]}


def test_licence_comes_from_the_base_models_own_card_or_is_not_claimed(tmp_path):
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "README.md").write_text("---\nlicense: apache-2.0\ntags: [x]\n---\n# a model\n")
    assert base_model_licence(str(model)) == {"license": "apache-2.0"}
    assert base_model_licence("tiny-sd3") == {}
    cfg = _job(tmp_path, "model.pretrained=tiny-sd3", "hub.trigger=shapez")
    text = write_model_card(cfg, cfg.output_dir).read_text()
    meta = front_matter(text)
    assert "base_model" not in meta and "license" not in meta  # not a hub model: nothing claimed
    assert meta["instance_prompt"] == "shapez" and "see its model card" in text


def test_hf_token_comes_from_the_environment_only(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    cfg = _job(tmp_path, f"data.cache_dir={tmp_path / 'cache'}")
    (tmp_path / "demo").mkdir()
    with pytest.raises(ConfigError, match="hub.repo_id is set .*HF_TOKEN is not in the environment"):
        check_paths(cfg)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    check_paths(cfg)
    for key in ("token", "hf_token", "api_key"):
        with pytest.raises(ConfigError) as err:
            _job(tmp_path, f"hub.{key}={TOKEN}")
        assert "set HF_TOKEN in the environment" in str(err.value) and TOKEN not in str(err.value)


def test_train_without_hf_token_stops_before_ray(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    r = subprocess.run([sys.executable, "-m", "raytune_sd3.train", "jobs/tiny.yaml", "--set", f"output_dir={out}",
                        "--set", "hub.repo_id=me/tiny-lora"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 2 and "HF_TOKEN is not in the environment" in r.stderr, r.stdout + r.stderr
    assert not (out / "ray.log").exists()  # Ray never started


class _Failing(http.server.BaseHTTPRequestHandler):
    seen: list = []

    def _fail(self):
        self.seen.append((self.command, self.path, self.headers.get("authorization")))
        body = b'{"error": "internal error"}'
        self.send_response(500)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_HEAD = _fail

    def log_message(self, *args):
        pass


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("endpoint", ["server-500", "closed-port"])
def test_a_failed_upload_keeps_the_lora_and_card_and_says_how_to_retry(tmp_path, endpoint):
    server = None
    if endpoint == "server-500":
        _Failing.seen = []
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.server_address[1]
    else:
        port = _closed_port()
    cfg = _job(tmp_path)
    out = cfg.output_dir
    _validation(out, 40, (0, 0, 255))
    (out / "job.yaml").write_text(dump_job(cfg))
    lora = os.urandom(4096)
    (out / "pytorch_lora_weights.safetensors").write_bytes(lora)
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0"}
    try:
        r = subprocess.run([sys.executable, "-m", "raytune_sd3.hub", str(out)], cwd=ROOT, capture_output=True,
                           text=True, timeout=180, env=env)
    finally:
        if server is not None:
            server.shutdown()
    console = r.stdout + r.stderr
    assert r.returncode == 4, console
    assert "upload to the Hugging Face Hub (me/fox-lora) failed" in console
    assert f"retry: HF_TOKEN=... python -m raytune_sd3.hub {out} --repo-id me/fox-lora" in console
    assert console.count("upload to the Hugging Face Hub") == 1 and "Traceback" not in console, console
    assert "HTTP Request" not in console and TOKEN not in console
    assert (out / "pytorch_lora_weights.safetensors").read_bytes() == lora
    assert front_matter((out / "README.md").read_text())["base_model"] == LARGE
    if server is not None:  # it did ask the Hub's API to create the repo, with the token from the environment
        assert ("POST", "/api/repos/create", f"Bearer {TOKEN}") in _Failing.seen, _Failing.seen


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """The Hub API calls an upload makes (create the repo, validate the card's front matter, ask how to send each
    file, commit them inline), answered as huggingface_hub expects; records what it was asked and received."""

    created: list = []
    files: dict = {}
    auth: set = set()

    def _json(self, code: int, value) -> None:
        body = json.dumps(value).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 - huggingface_hub's own lookups (agent registry): nothing to say
        self._json(404, {"error": "not found"})

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        host = f"http://{self.headers['host']}"
        if self.path.startswith("/api/"):
            self.auth.add(self.headers.get("authorization"))
        if self.path == "/api/repos/create":
            request = json.loads(body)
            self.created.append(request)
            repo = f"{request.get('organization') or 'me'}/{request['name']}"
            return self._json(200, {"url": f"{host}/{repo}"})
        if self.path == "/api/validate-yaml":  # the README's front matter, before the commit
            meta = front_matter(json.loads(body)["content"])
            if not meta.get("license") or not meta.get("base_model"):
                return self._json(400, {"errors": [{"message": "license and base_model expected"}]})
            return self._json(200, {"errors": [], "warnings": []})
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                              for f in files]})
        if "/commit/" in self.path:
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    self.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            return self._json(200, {"commitUrl": f"{host}/me/fox-lora/commit/{'a' * 40}", "commitOid": "a" * 40})
        self._json(404, {"error": self.path})

    def log_message(self, *args):
        pass


def test_an_upload_sends_the_card_images_and_lora_to_a_private_repo(tmp_path):
    _FakeHub.created, _FakeHub.files, _FakeHub.auth = [], {}, set()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cfg = _job(tmp_path)
    out = cfg.output_dir
    images = _validation(out, 40, (0, 0, 255))
    (out / "job.yaml").write_text(dump_job(cfg))
    lora = os.urandom(4096)
    (out / "pytorch_lora_weights.safetensors").write_bytes(lora)
    (out / "metrics.jsonl").write_text('{"step": 40, "loss": 0.5}\n')  # not part of the upload
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}", "HF_TOKEN": TOKEN,
           "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1"}
    try:
        r = subprocess.run([sys.executable, "-m", "raytune_sd3.hub", str(out)], cwd=ROOT, capture_output=True,
                           text=True, timeout=180, env=env)
    finally:
        server.shutdown()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "uploaded to" in r.stderr and "(private)" in r.stderr and TOKEN not in r.stdout + r.stderr
    assert len(_FakeHub.created) == 1, _FakeHub.created
    created = _FakeHub.created[0]
    assert (created["name"], created.get("organization")) == ("fox-lora", "me") and (
        created.get("private") is True or created.get("visibility") == "private"), created
    assert _FakeHub.auth == {f"Bearer {TOKEN}"}
    assert sorted(_FakeHub.files) == ["README.md", "images/00_64x64.png", "images/01_64x64.png",
                                      "pytorch_lora_weights.safetensors"]
    assert _FakeHub.files["pytorch_lora_weights.safetensors"] == lora
    assert [_FakeHub.files[f"images/{i:02d}_64x64.png"] for i in range(2)] == images
    assert _FakeHub.files["README.md"] == (out / "README.md").read_bytes()


def test_the_cards_snippet_loads_the_real_base_and_tags_are_not_repeated(tmp_path, tiny_sd3):
    """The snippet of a tiny run loads (its base built by raytune_sd3, not `from_pretrained("tiny-sd3")`); a folder
    in the HF cache is named by its hub id; no tag twice."""
    from raytune_sd3.hub.publish import model_card, snippet_base

    cfg = _job(tmp_path, "model.pretrained=tiny-sd3")
    text = model_card(cfg, [])
    assert len(front_matter(text)["tags"]) == len(set(front_matter(text)["tags"]))
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    assert 'from_pretrained("tiny-sd3"' not in code
    base_line = next(line for line in code.splitlines() if "from_pretrained" in line).split(".to(")[0]
    scope: dict = {}
    exec("\n".join(line for line in code.splitlines() if "import" in line) + "\n" + base_line.replace(
        "pipe =", "pipe ="), scope)  # the import and the base model load, as a user would run them (no CUDA here)
    assert type(scope["pipe"]).__name__ == "StableDiffusion3Pipeline"
    snapshot = "/data/hf/hub/models--stabilityai--stable-diffusion-3.5-large/snapshots/abc123"
    assert snippet_base(snapshot) == ('"stabilityai/stable-diffusion-3.5-large"', [])
    assert snippet_base(LARGE) == (f'"{LARGE}"', [])
