"""`genadapt ui`: the web app driven in headless Chromium (Playwright), its confinement to --root, and its jobs.

The browser tests need gradio (the `ui` extra), playwright (the `test` extra) and a Chromium on PATH (Debian's
`chromium`; `scripts/setup.sh` installs it where it can); each is skipped with the reason when missing.
Screenshots go to docs/ui/*.png with GENADAPT_UI_SCREENSHOTS=1 (docs/ui.md shows them).
"""

from __future__ import annotations

import html
import io
import json
import tempfile
import os
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

gr = pytest.importorskip("gradio", reason="genadapt ui needs gradio: pip install 'genadapt[ui]'")

from genadapt.errors import UserError  # noqa: E402
from genadapt.ui import MODES, App, Job, PathRefused, Root, host_warning, plan_job, start  # noqa: E402

# Screenshots for docs/ui.md only when asked (GENADAPT_UI_SCREENSHOTS=1): a test run must not rewrite the repository.
DOCS = (Path(__file__).resolve().parents[1] / "docs" / "ui") if os.environ.get("GENADAPT_UI_SCREENSHOTS") else Path(tempfile.mkdtemp(prefix="genadapt-ui-shots-"))
CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None)
try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - the test extra installs it
    sync_playwright = None
needs_browser = pytest.mark.skipif(
    sync_playwright is None or CHROMIUM is None,
    reason="browser tests need playwright (pip install playwright) and a Chromium on PATH (apt-get install chromium)",
)
PICK = MODES[1]
pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")  # pandas 3 deprecations inside gradio


def shapes(folder: Path, count: int = 10) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        image = Image.new("RGB", (48, 48), ((37 * index) % 256, (91 * index) % 256, (53 * index + 80) % 256))
        ImageDraw.Draw(image).ellipse((6 + index, 8, 42, 40 - index), fill=(255 - 20 * index, 20 * index, 140))
        path = folder / f"shape{index:02d}.png"
        image.save(path)
        paths.append(path)
    return paths


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ui-root")


@pytest.fixture(scope="module")
def server(root):
    running = start(root, host="127.0.0.1", port=free_port())
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser():
    if sync_playwright is None or CHROMIUM is None:
        pytest.skip("browser tests need playwright and a Chromium on PATH")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield chromium
        chromium.close()


def open_page(browser, server):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("console", lambda message: errors.append(f"console: {message.text}") if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(f"page error: {error}"))
    page.goto(server.url)
    page.wait_for_selector("#ga-upload")
    return page, errors


def field(page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


# ----------------------------------------------------------------------------- in the browser


@needs_browser
def test_upload_compare_answer_and_sample_in_the_browser(browser, server, root, tmp_path):
    page, errors = open_page(browser, server)
    field(page, "ga-upload-name").fill("shapes")
    page.locator("#ga-upload input[type=file]").set_input_files([str(p) for p in shapes(tmp_path / "pictures")])
    page.wait_for_selector("#ga-inspect")
    assert "10 usable image(s), 0 unusable" in page.inner_text("#ga-inspect")
    assert "saved 10 file(s) to uploads/shapes" in page.inner_text("#ga-data-status")
    page.screenshot(path=str(DOCS / "data.png"), full_page=True)

    page.get_by_role("tab", name="3 · Compare or one run").click()
    assert field(page, "ga-data").input_value() == "uploads/shapes"
    page.get_by_label(PICK).check()
    page.locator("#ga-techniques").get_by_label("embedding", exact=True).uncheck()
    page.locator("#ga-techniques").get_by_label("lora", exact=True).check()
    field(page, "ga-shots").fill("1")
    field(page, "ga-steps").fill("4")
    field(page, "ga-out").fill("runs/ui-test")
    page.get_by_text("More settings").click()
    field(page, "ga-caption").fill("a photo")
    field(page, "ga-samples").fill("4")
    field(page, "ga-replicates").fill("1")
    field(page, "ga-sample-steps").fill("1")
    field(page, "ga-lr-probe").fill("1")  # the probe's own tests are in test_compare.py
    assert page.locator("#ga-variant").is_visible()  # variants: test_variants_become_one_flag_each_...
    page.locator("#ga-start").click()
    page.wait_for_selector(".ga-run", timeout=60_000)
    command = page.inner_text("#ga-command")
    assert "genadapt compare --base pocket-sd --data uploads/shapes --out runs/ui-test --shots 1 --techniques lora --steps 4" in command
    page.screenshot(path=str(DOCS / "progress.png"), full_page=True)

    page.wait_for_selector("#ga-verdict, #ga-job-status .ga-error", timeout=150_000)
    assert page.locator("#ga-verdict").count() == 1, f"{page.inner_text('#ga-job-status')}\n{field(page, 'ga-log').input_value()}"
    assert "With 1 shot(s) use lora" in page.inner_text("#ga-verdict")
    assert "finished in" in page.inner_text("#ga-job-status")
    assert "4/4 steps · done" in page.inner_text("#ga-progress")
    # samples as they appeared, loaded from the run folder
    samples = page.locator("#ga-progress img.ga-sample")
    assert samples.count() >= 1
    page.wait_for_function("() => [...document.querySelectorAll('#ga-progress img.ga-sample')].every(i => i.complete && i.naturalWidth > 0)")
    # the report inline, with its pictures (the shots beside the samples)
    report = page.frame_locator("#ga-report")
    assert "Which technique fits this data?" in report.locator("h1").inner_text()
    page.wait_for_function("""() => { const d = document.querySelector('#ga-report').contentDocument;
        const images = d ? [...d.querySelectorAll('img')] : []; return images.length >= 2 && images.every(i => i.complete && i.naturalWidth > 0); }""")
    # a download per run: its artifact as a zip
    link = page.locator("#ga-downloads a.ga-download")
    assert link.count() == 1 and "lora-1shot-r0.zip" in link.inner_text()
    response = page.request.get(server.url + link.get_attribute("href"))
    assert response.status == 200
    names = zipfile.ZipFile(io.BytesIO(response.body())).namelist()
    for member in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors", "peft/adapter_config.json", "config.yaml"):
        assert f"lora-1shot-r0/{member}" in names, names
    page.locator("#ga-answer").scroll_into_view_if_needed()
    page.screenshot(path=str(DOCS / "answer.png"), full_page=True)

    # sample: the base with the LoRA run composed at a slider's weight; prompt and seed in, images out
    page.get_by_role("tab", name="4 · Sample").click()
    page.locator("#ga-find-runs").click()
    lora = field(page, "ga-lora-0")
    lora.fill("runs/ui-test/runs/lora-1shot-r0")
    lora.press("Enter")
    weight = page.locator("#ga-lora-weight-0 input[type=number]")  # the slider's number box
    weight.fill("0.8")
    weight.press("Enter")
    field(page, "ga-prompt").fill("a photo")
    field(page, "ga-sampling-steps").fill("2")
    page.locator("#ga-generate").click()
    page.wait_for_selector("#ga-sample-status .ga-ok", timeout=60_000)
    assert "4 image(s) of pocket-sd + runs/ui-test/runs/lora-1shot-r0@0.8, seed 0" in page.inner_text("#ga-sample-status")
    page.wait_for_function("() => document.querySelectorAll('#ga-gallery img').length >= 4")
    page.screenshot(path=str(DOCS / "sample.png"), full_page=True)
    # a GAN takes no diffusion LoRA: the API's message, no traceback
    model = field(page, "ga-sample-model")
    model.fill("pocket-stylegan2")
    model.press("Enter")
    field(page, "ga-prompt").fill("")
    page.locator("#ga-generate").click()
    page.wait_for_selector("#ga-sample-status .ga-error", timeout=60_000)
    assert "--lora composes diffusion LoRA runs" in page.inner_text("#ga-sample-status")
    assert "Traceback" not in page.content()
    assert errors == []
    page.close()


@needs_browser
def test_broken_uploads_are_reported_by_name_and_reason(browser, server, tmp_path):
    broken = tmp_path / "broken"
    shapes(broken, 2)
    (broken / "empty.png").write_bytes(b"")
    (broken / "letter.jpg").write_text("Dear reader, this is not a JPEG.")
    whole = (broken / "shape00.png").read_bytes()
    (broken / "cut.png").write_bytes(whole[: len(whole) // 2])
    (broken / "tool.exe").write_bytes(b"MZ\x90\x00")
    page, errors = open_page(browser, server)
    field(page, "ga-upload-name").fill("broken")
    page.locator("#ga-upload input[type=file]").set_input_files([str(p) for p in sorted(broken.iterdir())])
    page.wait_for_selector("#ga-unusable")
    assert "2 usable image(s), 4 unusable" in page.inner_text("#ga-inspect")
    rows = {row.locator("td").nth(0).inner_text(): row.locator("td").nth(1).inner_text() for row in page.locator("#ga-unusable tr").all()[1:]}
    assert rows["empty.png"].startswith("empty file (0 bytes)")
    assert rows["letter.jpg"].startswith("not an image Pillow can read")
    assert rows["cut.png"].startswith("truncated or corrupt image")
    assert rows["tool.exe"].startswith("not an image type genadapt reads")
    assert "Traceback" not in page.content() and "File \"" not in page.inner_text("body")
    page.screenshot(path=str(DOCS / "broken.png"), full_page=True)
    assert errors == []
    page.close()


# ----------------------------------------------------------------------------- confined to --root


def test_paths_outside_the_root_are_refused_typed_and_over_http(server, root, tmp_path, browser_or_none):
    import httpx
    from gradio_client import Client

    outside = tmp_path / "secret.txt"
    outside.write_text("not for the UI")
    (root / "escape").symlink_to(tmp_path, target_is_directory=True)
    (root / "note.txt").write_text("inside")
    get = httpx.Client(base_url=server.url, timeout=30)
    assert get.get("/genadapt/file/note.txt").text == "inside"
    for url in ("/genadapt/file/%2e%2e/%2e%2e/etc/passwd", f"/genadapt/file/{outside}", f"/genadapt/file/%2e%2e/{outside.parent.name}/secret.txt",
                "/genadapt/file/escape/secret.txt", "/genadapt/download/%2e%2e", "/genadapt/download/escape"):
        response = get.get(url)
        assert response.status_code == 403, url
        assert "refused" in response.text and "not for the UI" not in response.text
    assert get.get("/gradio_api/file=" + str(outside)).status_code in (403, 404)
    assert "not for the UI" not in get.get("/gradio_api/file=" + str(outside)).text

    client = Client(server.url + "/", verbose=False)
    try:
        status, *_ = client.predict(str(tmp_path), "", api_name="/inspect_folder")
        assert "refused, it is outside the UI's root" in html.unescape(status)
        status, *_ = client.predict("../", "", api_name="/inspect_folder")
        assert "refused, its '..' leads out of the UI's root" in html.unescape(status)
        status, *_ = client.predict("escape", "", api_name="/inspect_folder")
        assert "refused, a symbolic link in it points out of the UI's root" in html.unescape(status)
        status, _ = client.predict(str(tmp_path), "", 1, 1, 4, 0, 1.0, "", "", 1.0, "", 1.0, "", 1.0, api_name="/sample")
        assert "model " + str(tmp_path) + ": refused" in html.unescape(status)
        status, *_ = client.predict(str(tmp_path), {"headers": ["file", "caption", "from"], "data": [["x.png", "y", ""]]}, api_name="/save_captions")
        assert "refused" in html.unescape(status)
    finally:
        client.close()

    if browser_or_none is not None:  # typed into the page
        page, errors = open_page(browser_or_none, server)
        field(page, "ga-folder").fill("../../etc")
        page.locator("#ga-inspect-button").click()
        page.wait_for_selector("#ga-data-status .ga-error")
        assert "refused, its '..' leads out of the UI's root" in page.inner_text("#ga-data-status")
        page.get_by_role("tab", name="2 · Base").click()
        page.get_by_label("a local model folder or checkpoint").check()
        field(page, "ga-base-path").fill(str(outside))
        page.locator("#ga-check-base").click()
        page.wait_for_selector("#ga-base-status .ga-error")
        assert "refused, it is outside the UI's root" in page.inner_text("#ga-base-status")
        assert errors == []
        page.close()


@pytest.fixture
def browser_or_none(request):
    if sync_playwright is None or CHROMIUM is None:
        return None
    return request.getfixturevalue("browser")


def test_root_resolves_inside_and_refuses_escapes(tmp_path):
    (tmp_path / "root" / "data").mkdir(parents=True)
    (tmp_path / "root" / "link").symlink_to(tmp_path)
    root = Root(tmp_path / "root")
    assert root.resolve("data") == (tmp_path / "root" / "data").resolve()
    assert root.resolve("data/../data/x.png") == (tmp_path / "root" / "data" / "x.png").resolve()
    assert root.rel(root.resolve(str(tmp_path / "root" / "data"))) == "data"
    for text in ("..", "data/../../x", "/etc/passwd", "link/elsewhere", "link/root/../x", "a\x00b"):
        with pytest.raises(PathRefused):
            root.resolve(text)
    with pytest.raises(UserError, match="no such file or folder"):
        root.resolve("missing", must_exist=True)
    with pytest.raises(UserError, match="no such folder"):
        Root(tmp_path / "nowhere")


def test_host_warning_only_when_not_local(tmp_path):
    root = Root(tmp_path)
    assert host_warning("127.0.0.1", 7860, root) is None and host_warning("localhost", 7860, root) is None
    warning = host_warning("0.0.0.0", 7860, root)
    assert warning.startswith("warning: ") and "\n" not in warning and "--host 127.0.0.1" in warning


def test_cli_ui_command_defaults_and_missing_gradio(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import genadapt.ui
    from genadapt.cli import app

    calls = []
    monkeypatch.setattr(genadapt.ui, "serve", lambda **kwargs: calls.append(kwargs))
    result = CliRunner().invoke(app, ["ui", "--root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert calls == [{"host": "127.0.0.1", "port": 7860, "root": tmp_path, "max_upload_mb": 50.0}]
    monkeypatch.setitem(sys.modules, "gradio", None)
    result = CliRunner().invoke(app, ["ui"])
    assert result.exit_code == 2
    assert "pip install 'genadapt[ui]'" in result.output and "Traceback" not in result.output


def test_form_becomes_the_cli_command_and_cli_errors(tmp_path):
    root = Root(tmp_path)
    shapes(tmp_path / "uploads" / "set", 3)
    form = {"mode": PICK, "base_choice": "pocket-sd", "data": "uploads/set", "out": str(tmp_path / "runs" / "x"), "techniques": ["lora"],
            "shots": "1,2", "steps": 5, "samples": 4, "replicates": 1, "sample_steps": 1, "seed": 0}
    plan = plan_job(root, form)
    assert plan["argv"] == ["compare", "--base", "pocket-sd", "--data", "uploads/set", "--out", "runs/x", "--shots", "1,2", "--techniques", "lora",
                            "--steps", "5", "--samples", "4", "--replicates", "1", "--seed", "0", "--sample-steps", "1"]
    probe_argv = plan_job(root, {**form, "lr_probe": 1})["argv"]
    assert probe_argv[probe_argv.index("--lr-probe") + 1] == "1"
    chosen = plan_job(root, {**form, "mode": MODES[0], "budget_minutes": 2})
    assert "--techniques" not in chosen["argv"] and "--steps" not in chosen["argv"] and chosen["argv"][chosen["argv"].index("--budget-minutes") + 1] == "2.0"
    with pytest.raises(UserError, match="--techniques bogus: not a compare technique for diffusion bases"):
        plan_job(root, {**form, "techniques": ["bogus"]})
    with pytest.raises(UserError, match="--caption applies to diffusion bases"):
        plan_job(root, {**form, "base_choice": "pocket-stylegan2", "techniques": ["freeze"], "caption": "a flag"})
    with pytest.raises(UserError, match="pass --allow-pickle"):
        App(tmp_path).check_base("a local model folder or checkpoint", _pickle(tmp_path), False)
    one = plan_job(root, {**form, "mode": MODES[2], "train": "embedding", "steps": 3})
    assert one["argv"][:1] == ["adapt"] and one["steps"] == 3 and "--train" in one["argv"]


def test_variants_become_one_flag_each_and_are_checked_before_the_job(tmp_path):
    from genadapt.cli import app as cli

    root = Root(tmp_path)
    shapes(tmp_path / "uploads" / "set", 3)
    form = {"mode": PICK, "base_choice": "pocket-sd", "data": "uploads/set", "out": "runs/v", "techniques": ["lora"], "shots": "2",
            "steps": 5, "samples": 4, "replicates": 1, "sample_steps": 1, "seed": 0,
            "variant": "lora_r8=lora,rank=8\n\n  lora_qv=lora,lora_targets=to_q,to_v  \n"}
    argv = plan_job(root, form)["argv"]
    specs = [argv[i + 1] for i, a in enumerate(argv) if a == "--variant"]
    assert specs == ["lora_r8=lora,rank=8", "lora_qv=lora,lora_targets=to_q,to_v"]
    # the CLI reads that argv back as the same two variants
    assert list(cli.get_command(None, "compare").make_context("compare", argv[1:]).params["variant"]) == specs
    with pytest.raises(UserError, match="--variant x: bogus is not a setting of genadapt adapt"):
        plan_job(root, {**form, "variant": "x=lora,bogus=1"})
    with pytest.raises(UserError, match="--variant lora=lora,rank=8: lora names"):
        plan_job(root, {**form, "variant": "lora=lora,rank=8"})
    assert "--variant" not in plan_job(root, {**form, "variant": " \n"})["argv"]


def _pickle(folder: Path) -> str:
    path = folder / "ffhq.pt"
    path.write_bytes(b"\x80\x04not read")
    return "ffhq.pt"


def test_captions_are_written_as_kohya_sidecars(tmp_path):
    app = App(tmp_path)
    shapes(tmp_path / "uploads" / "set", 2)
    (tmp_path / "uploads" / "set" / "shape01.txt").write_text("old words\n")
    _, _, table, folder = app.inspect_folder("uploads/set")
    assert folder == "uploads/set" and table["data"] == [["shape00.png", "", "none"], ["shape01.png", "old words", "shape01.txt"]]
    status, _, table, _ = app.save_captions("uploads/set", {"data": [["shape00.png", "a red ball", "none"], ["shape01.png", "", "shape01.txt"]]})
    assert "wrote 2 caption file(s)" in status
    assert (tmp_path / "uploads" / "set" / "shape00.txt").read_text() == "a red ball\n"
    assert not (tmp_path / "uploads" / "set" / "shape01.txt").exists()  # cleared: no sidecar, the fallback caption applies
    with pytest.raises(UserError, match="not a usable image"):
        app.save_captions("uploads/set", {"data": [["../../x.png", "escape", ""]]})


def test_cancel_checkpoints_and_the_cli_resumes_the_same_run(tmp_path):
    """The UI's job is the CLI command: SIGINT stops it at a checkpoint (exit 130) and the same command finishes it."""
    root = Root(tmp_path)
    shapes(tmp_path / "uploads" / "set", 4)
    plan = plan_job(root, {"mode": MODES[2], "base_choice": "pocket-sd", "data": "uploads/set", "out": "runs/one", "train": "embedding",
                           "steps": 60, "caption": "a photo", "seed": 0})
    job = Job(root, plan)
    log = tmp_path / "runs" / "one" / "log.jsonl"
    deadline = time.time() + 90
    while job.running and not (log.is_file() and log.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.1)
    job.cancel()
    assert job.wait(90) == 130, job.log_lines()
    state, message = job.outcome()
    assert state == "cancelled" and "resume" in message
    assert (tmp_path / "runs" / "one" / "checkpoints").is_dir() and not (tmp_path / "runs" / "one" / "summary.json").exists()
    stopped_at = json.loads(log.read_text().splitlines()[-1])["step"]
    assert stopped_at < 60
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    resumed = subprocess.run([sys.executable, "-m", "genadapt", *plan["argv"]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == list(range(1, 61))
    assert json.loads((tmp_path / "runs" / "one" / "summary.json").read_text())["steps"] == 60


def test_uploads_are_checked_for_origin_type_and_size(tmp_path):
    from genadapt.ui import save_uploads

    (tmp_path / "root").mkdir()
    cache, root = tmp_path / "gradio", Root(tmp_path / "root")
    shapes(cache, 2)
    (cache / "big.png").write_bytes(b"\x89PNG" + b"\x00" * 2000)
    (cache / "run.sh").write_text("echo hi")
    (cache / "shape00.txt").write_text("a caption")
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes((cache / "shape00.png").read_bytes())
    files = [cache / "shape00.png", cache / "shape01.png", cache / "shape00.txt", cache / "big.png", cache / "run.sh", outside]
    folder, refused, saved = save_uploads(root, [str(p) for p in files], "../../my set", 1000, sources=cache)
    assert folder == root.path / "uploads" / "my_set"
    assert saved == ["shape00.png", "shape01.png", "shape00.txt"]
    reasons = dict(refused)
    assert "more than the 0.001 MB" in reasons["big.png"] and "not an image type" in reasons["run.sh"]
    assert reasons["elsewhere.png"] == "not an uploaded file; not saved"
