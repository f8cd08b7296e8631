"""Tests of the screening page (anemia_jax.app) on the tiny UNet++ run (_tiny_run.py) with a screening model fitted
on phantom photos: the HTTP routes (result, CSV, limits, bad uploads, concurrent uploads) with a plain client, and
the page end to end in headless Chromium driven by Selenium (skipped when Debian's chromium / chromium-driver or
selenium are absent; .ci/run installs them)."""

from __future__ import annotations

import concurrent.futures
import csv
import http.client
import io
import json
import pathlib
import shutil
import threading
import time
import urllib.error
import urllib.request

import _children
import numpy as np
import PIL.Image
import pytest
from _phantom_screening import fit_on_phantom
from _tiny_run import workdir  # noqa: F401 -- pytest fixture

from anemia_jax import app
from anemia_jax.data.datasets.conjunctiva_phantom import phantom
from anemia_jax.screening import app_server, photo_report
from anemia_jax.utils import image_io

MAX_UPLOAD = 2_000_000
def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def screening_path(tmp_path_factory):
    """A screening model fitted on 40 phantom photos' true palpebral masks (64x48), saved as JSON."""
    model, _ = fit_on_phantom(40)
    return model.save(tmp_path_factory.mktemp("model") / "screening_model.json")


@pytest.fixture(scope="module")
def service(workdir, screening_path):
    cmd = app._command()
    # --runs is the spelling of --workdir.
    assert cmd.parse_runs(["app", f"--runs={workdir}", f"--screening={screening_path}", "--max_megapixels=1"]) == []
    return app.build_service(cmd)


@pytest.fixture(scope="module")
def url(service):
    server = app_server.make_server(service, "127.0.0.1", 0, max_upload_bytes=MAX_UPLOAD)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def photo_file(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("photos") / "phantom_eye.png"
    path.write_bytes(_png(phantom.generate_example(0, 45, long_side=64).image))
    return path


def _post(url: str, data: bytes, name: str = "x.png", sex: str = "") -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/api/photo?name={name}&sex={sex}", data=data, method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _get(url: str) -> tuple[int, bytes, dict]:
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.status, response.read(), dict(response.headers)


def test_the_page_compiles_before_it_opens(workdir):
    cmd = app._command()
    assert cmd.parse_runs(["app", f"--workdir={workdir}"]) == []
    service = app.build_service(cmd)
    # The prediction program is compiled (and has run) before the server listens: the first photo waits for no
    # compilation.
    assert service.segmenter._members._cache_size() == 1


def test_page_and_settings(url):
    status, page, headers = _get(f"{url}/")
    assert status == 200 and b"Conjunctiva screening" in page and b'capture="environment"' in page
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert b"http://" not in page and b"https://" not in page  # nothing is fetched from elsewhere
    info = json.loads(_get(f"{url}/api/info")[1])
    assert info["targets"] == ["palpebral", "forniceal_palpebral"] and info["screening"] and info["verdict"]
    assert info["max_upload_bytes"] == MAX_UPLOAD


def test_photo_result_matches_the_segmenter_and_lands_in_the_csv(url, service, photo_file):
    status, result = _post(url, photo_file.read_bytes(), "phantom_eye.png", "F")
    assert status == 200, result
    photo = image_io.load_photo(photo_file)
    seg = service.segmenter.segment([photo])[0]
    assert [t["fraction"] for t in result["targets"]] == pytest.approx(list(seg.fractions()))
    assert result["overlay"].startswith("data:image/jpeg;base64,") and (result["width"], result["height"]) == (48, 64)
    assert result["uncertainty"].startswith("data:image/png;base64,")
    assert result["verdict"]["label"] in ("usable", "retake") and result["screening"]["sex"] == "F"
    assert result["screening"]["who_threshold"] == (12.0 if result["verdict"]["label"] == "usable" else None)
    _, body, headers = _get(f"{url}/results.csv?ids={result['id']},unknown")
    assert headers["Content-Disposition"].startswith("attachment")
    rows = list(csv.DictReader(io.StringIO(body.decode())))
    assert len(rows) == 1 and rows[0]["file"] == "phantom_eye.png" and rows[0]["sex"] == "F"
    assert float(rows[0]["fraction/palpebral"]) == pytest.approx(result["targets"][0]["fraction"], abs=1e-6)
    assert rows[0]["verdict"] == result["verdict"]["label"]


@pytest.fixture(scope="module")
def black_file(tmp_path_factory) -> pathlib.Path:
    """A black photo: too dark, so a photo to retake whatever the segmentation."""
    path = tmp_path_factory.mktemp("photos") / "black_eye.png"
    path.write_bytes(_png(np.zeros((64, 48, 3), np.uint8)))
    return path


def test_a_retake_photo_has_no_hb_in_the_result_or_the_csv_and_the_origin_is_shown(url, black_file):
    info = json.loads(_get(f"{url}/api/info")[1])
    assert info["provenance"]["kind"] == "phantom" and info["provenance"]["long"].startswith("PHANTOM MODEL")
    assert "Research use only" in info["notice"] and info["who_thresholds"]["F"] == 12.0
    status, result = _post(url, black_file.read_bytes(), "black_eye.png", "F")
    assert status == 200, result
    s = result["screening"]
    assert result["verdict"]["label"] == "retake" and result["verdict"]["codes"][0] == "too_dark"
    assert s["answer"] == "retake" and "too dark" in s["answer_why"]
    for key in ("hgb", "hgb_lo", "hgb_hi", "p_anemia", "who_threshold", "call", "coverage", "threshold"):
        assert s[key] is None, key
    assert s["provenance"].startswith("PHANTOM MODEL")
    [row] = csv.DictReader(io.StringIO(_get(f"{url}/results.csv?ids={result['id']}")[1].decode()))
    assert row["verdict"] == "retake" and row["answer"] == "Retake the photo" and row["model_data"] == "phantom"
    assert all(row[c] == "" for c in ("hgb_g_dl", "hgb_lo_g_dl", "hgb_hi_g_dl", "p_anemia", "anemia_call",
                                      "who_threshold_g_dl", "hgb_vs_who"))


def _decoded(data_url: str) -> np.ndarray:
    import base64

    return np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))))


def test_large_photo_is_drawn_at_display_size(service, monkeypatch):
    # A phone photo is shown at most display_size pixels wide: its overlay and uncertainty map are drawn at that
    # size, never at the photo's (which took seconds), and look like the full-size drawing shrunk.
    photo = np.asarray(PIL.Image.fromarray(phantom.generate_example(0, 45, long_side=64).image).resize(
        (600, 800), PIL.Image.Resampling.BILINEAR))
    seg = service.segmenter.segment([photo])[0]
    full_overlay = seg.overlay(photo)
    full_heat = photo_report.uncertainty_image(photo, seg, service.assessor.channel)  # the verdict's view
    monkeypatch.setattr(service, "display_size", 200)
    monkeypatch.setattr(type(seg), "overlay", lambda *a, **k: pytest.fail("full-size overlay drawn"))
    monkeypatch.setattr(type(seg), "uncertainty", property(lambda _: pytest.fail("full-size uncertainty drawn")))
    result = service.analyse(_png(photo), "big.png")
    overlay, heat = _decoded(result["overlay"]), _decoded(result["uncertainty"])
    assert overlay.shape == (200, 150, 3) and heat.shape == (200, 150, 3)
    shrunk = np.asarray(PIL.Image.fromarray(full_overlay).resize((150, 200), PIL.Image.Resampling.BILINEAR))
    assert np.abs(overlay.astype(float) - shrunk).mean() < 12  # JPEG and resampling apart, the same picture
    shrunk_heat = np.asarray(PIL.Image.fromarray(full_heat).resize((150, 200), PIL.Image.Resampling.BILINEAR))
    assert np.abs(heat.astype(float) - shrunk_heat).mean() < 6
    assert [t["fraction"] for t in result["targets"]] == pytest.approx(list(seg.fractions()))  # still full size


def test_bad_uploads_are_messages_and_the_server_keeps_answering(url, photo_file, monkeypatch):
    status, body = _post(url, b"this is not a photo", "notes.txt")
    assert status == 415 and "not an image" in body["error"] and "notes.txt" in body["error"]
    good = photo_file.read_bytes()
    status, body = _post(url, good[: len(good) // 2], "cut.png")
    assert status == 400 and "truncated or damaged" in body["error"]
    status, body = _post(url, b"", "empty.jpg")
    assert status == 400 and "empty" in body["error"]
    status, body = _post(url, good, "x.png", "alien")
    assert status == 400 and "unknown sex" in body["error"]

    # A decompression bomb is refused from its header: the pixels are never decoded.
    def never(data):
        raise AssertionError("decoded a photo over the pixel limit")

    monkeypatch.setattr(image_io, "decode_photo", never)
    status, body = _post(url, _png(np.zeros((1000, 1100, 3), np.uint8)), "huge.png")
    assert status == 413 and "megapixels" in body["error"]
    monkeypatch.undo()

    # A body over the size limit is refused from its Content-Length.
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request("POST", "/api/photo?name=big.jpg", body=b"\0" * (MAX_UPLOAD + 1))
    response = connection.getresponse()
    assert response.status == 413 and "the limit is 2 MB" in json.loads(response.read())["error"]
    connection.close()

    assert _get(f"{url}/healthz")[1] == b"ok\n"
    assert _post(url, good, "again.png")[0] == 200


def test_concurrent_uploads_are_all_answered(url, photo_file):
    data = photo_file.read_bytes()
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda i: _post(url, data, f"p{i}.png"), range(6)))
    assert all(status == 200 for status, _ in results)
    fractions = {tuple(t["fraction"] for t in r["targets"]) for _, r in results}
    assert len(fractions) == 1 and len({r["id"] for _, r in results}) == 6


# ------------------------------------------------------------------------------------------- real browser

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver "
                    "(apt-get install -y chromium chromium-driver; .ci/run installs them)")
def test_page_in_headless_chromium(url, photo_file, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e '.[test]')")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    start = time.perf_counter()
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # The flags this machine's notes give for Chromium as root with no network beyond the registries.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1000"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    wait = WebDriverWait(driver, 120 * _children.load_factor())  # a busy machine gets longer
    try:
        driver.get(url)
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
        chooser = driver.find_element(By.ID, "photos")
        driver.execute_script("arguments[0].style.display = 'block';", chooser)  # the label hides it
        chooser.send_keys(str(photo_file))
        card = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "article.card"))[0]
        overlay = card.find_element(By.CSS_SELECTOR, "img.overlay")
        wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", overlay))
        assert "phantom_eye.png" in card.text
        fractions = [td.get_attribute("textContent") for td in card.find_elements(By.CSS_SELECTOR, "td.fraction")]
        assert len(fractions) == 2 and all(f.endswith("%") for f in fractions)  # in the technical details
        assert card.find_element(By.CSS_SELECTOR, "[data-verdict]").get_attribute("data-verdict") in ("usable",
                                                                                                       "retake")
        assert "Hb" in card.find_element(By.CSS_SELECTOR, ".screening").text
        assert card.find_elements(By.CSS_SELECTOR, "img.uncertainty")

        driver.find_element(By.ID, "csv").click()
        target = downloads / "screening.csv"
        deadline = _children.Deadline(30)  # unloaded seconds: longer on a busy machine
        while not target.is_file() and not deadline.passed():
            time.sleep(0.2)
        rows = list(csv.DictReader(io.StringIO(target.read_text())))
        assert [r["file"] for r in rows] == ["phantom_eye.png"]

        broken = tmp_path / "broken.jpg"
        broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        chooser.send_keys(str(broken))
        wait.until(lambda d: "broken.jpg" in d.find_element(By.ID, "error").text)
        assert "not an image" in driver.find_element(By.ID, "error").text
        assert _get(f"{url}/healthz")[1] == b"ok\n"  # the server still answers
        chooser.send_keys(str(photo_file))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "article.card")) == 2)
    finally:
        driver.quit()
    print(f"BROWSER test: {time.perf_counter() - start:.1f} s")


def _chromium(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e '.[test]')")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1000"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver")
def test_page_table_shows_no_hb_for_a_retake_photo(url, black_file, tmp_path):
    """The summary table and the card of a photo to retake show the answer and why, and no Hb number; the page
    shows the model's origin (PHANTOM) and the research-use notice."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _chromium(tmp_path)
    wait = WebDriverWait(driver, 120)
    try:
        driver.get(url)
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
        assert driver.find_element(By.ID, "banner").text.startswith("PHANTOM MODEL")
        assert "Research use only" in driver.find_element(By.ID, "notice").text
        chooser = driver.find_element(By.ID, "photos")
        driver.execute_script("arguments[0].style.display = 'block';", chooser)
        chooser.send_keys(str(black_file))
        row = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#summary-body tr"))[0]
        cells = [td.text for td in row.find_elements(By.TAG_NAME, "td")]
        assert cells[:3] == ["black_eye.png", "retake", "Retake the photo"]
        assert cells[3].startswith("none: ") and "too dark" in cells[3]
        assert "g/dL" not in row.text and not any(ch.isdigit() for ch in row.text.replace("black_eye.png", ""))
        card = driver.find_element(By.CSS_SELECTOR, "article.card")
        screening = card.find_element(By.CSS_SELECTOR, ".screening").text
        assert "No Hb estimate" in screening and "g/dL" not in screening and "PHANTOM MODEL" in screening
    finally:
        driver.quit()
