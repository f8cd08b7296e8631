"""The README's screenshot of the screening page: the page served in this process, photos uploaded in headless Chromium.

    python -m experiments.page_screenshot --out=docs/screening_page.png PHOTO [PHOTO ...] -- \
        --workdir=RUN [--workdir=RUN2 ...] --screening=model.json [--checkpoint=latest] [app flags]

Everything after ``--`` is ``python -m anemia_jax.app``'s command line (`anemia_jax.app.build_service`); the server
listens on a free port of 127.0.0.1, the photos are chosen on the page one after the other (the last one's card is on
top), the first card's technical details stay folded, and the window (1200 px wide) is captured at the page's full
height. Needs Debian's chromium and chromium-driver and selenium (`tests/test_app.py` uses the same).
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import tempfile
import threading
from collections.abc import Sequence


def main(argv: Sequence[str]) -> int:
    from selenium import webdriver  # noqa: PLC0415
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from anemia_jax import app  # noqa: PLC0415
    from anemia_jax.screening import app_server

    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="python -m experiments.page_screenshot")
    parser.add_argument("--out", required=True)
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("photos", nargs="+")
    args = parser.parse_args(argv[1:split])
    cmd = app._command()
    if cmd.parse_runs(["app", *argv[split + 1:]]) is None:
        return 0
    server = app_server.make_server(app.build_service(cmd), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    profile = tempfile.mkdtemp(prefix="page_screenshot_")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", f"--window-size={args.width},1000", "--hide-scrollbars"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    try:
        wait = WebDriverWait(driver, 300)
        driver.get(f"http://127.0.0.1:{server.server_address[1]}/")
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
        chooser = driver.find_element(By.ID, "photos")
        driver.execute_script("arguments[0].style.display = 'block';", chooser)
        for k, photo in enumerate(args.photos, start=1):
            chooser.send_keys(str(pathlib.Path(photo).resolve()))
            wait.until(lambda d, k=k: len(d.find_elements(By.CSS_SELECTOR, "article.card")) == k)
        driver.execute_script("arguments[0].style.display = 'none';", chooser)
        wait.until(lambda d: d.execute_script(
            "return Array.from(document.images).every((i) => i.complete && i.naturalWidth > 0)"))
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(args.width, height + 40)
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(args.out)
    finally:
        driver.quit()
        server.shutdown()
        server.server_close()
        shutil.rmtree(profile, ignore_errors=True)
    print(f"Wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
