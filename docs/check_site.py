"""Check the built documentation site as a reader's browser sees it (``make docs-check``).

Serves ``site/`` on a loopback port, opens every page in headless Chromium (Debian's
``chromium`` and ``chromium-driver``, driven by selenium) and fails on a console error, an image
that did not load, or an internal link to a page or anchor that does not exist. Saves
screenshots of the home page and one API page.

    python docs/check_site.py site --screenshots site-check
"""
from __future__ import annotations

import argparse
import functools
import http.server
import pathlib
import shutil
import sys
import threading
import urllib.parse

# What the page reports about itself once loaded: broken images and every link with its anchor.
PAGE_STATE = """
return {
  brokenImages: Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0)
                     .map(i => i.getAttribute('src')),
  links: Array.from(document.querySelectorAll('a[href]')).map(a => a.href),
  ids: Array.from(document.querySelectorAll('[id]')).map(e => e.id),
};
"""
SCREENSHOTS = {"home.png": "index.html", "api.png": "api/ops/index.html"}


def find(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SystemExit(f"{name} not found: install Debian's chromium and chromium-driver "
                         f"(make docs-check does so where apt-get is available)")
    return path


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = find("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900", "--hide-scrollbars"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: selenium would otherwise try to download one (no network here).
    return webdriver.Chrome(service=Service(executable_path=find("chromedriver")), options=options)


def serve(root: pathlib.Path):
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def check(site: pathlib.Path, screenshots: pathlib.Path | None) -> list[str]:
    pages = sorted(p.relative_to(site).as_posix() for p in site.rglob("*.html") if p.name != "404.html")
    if "index.html" not in pages:
        return [f"{site}: no index.html (build the site first: make docs)"]
    server, base = serve(site)
    driver = browser()
    problems, ids, links = [], {}, []
    try:
        for page in pages:
            driver.get(base + page)
            state = driver.execute_script(PAGE_STATE)
            ids[page] = set(state["ids"])
            for entry in driver.get_log("browser"):
                if entry["level"] == "SEVERE":
                    problems.append(f"{page}: console error: {entry['message']}")
            problems += [f"{page}: image did not load: {src}" for src in state["brokenImages"]]
            links += [(page, href) for href in state["links"]]
            if screenshots is not None and page in SCREENSHOTS.values():
                name = next(k for k, v in SCREENSHOTS.items() if v == page)
                screenshots.mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(str(screenshots / name))
    finally:
        driver.quit()
        server.shutdown()
    for page, href in links:
        if not href.startswith(base):
            continue  # external: not checked offline
        url = urllib.parse.urlsplit(href[len(base):])
        target = urllib.parse.unquote(url.path)
        if target == "" or target.endswith("/"):
            target += "index.html"
        if not (site / target).is_file():
            problems.append(f"{page}: dead link {href[len(base):]}")
        elif url.fragment and target in ids and urllib.parse.unquote(url.fragment) not in ids[target]:
            problems.append(f"{page}: link to a missing anchor {href[len(base):]}")
    missing = [name for name, page in SCREENSHOTS.items() if page not in pages]
    problems += [f"no page {SCREENSHOTS[name]} for the screenshot {name}" for name in missing]
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", type=pathlib.Path, help="the built site (mkdocs build --site-dir)")
    parser.add_argument("--screenshots", type=pathlib.Path, default=None,
                        help="folder for home.png and api.png (default: none taken)")
    args = parser.parse_args(argv)
    problems = check(args.site, args.screenshots)
    for line in problems:
        print(line, file=sys.stderr)
    pages = sum(1 for p in args.site.rglob("*.html") if p.name != "404.html")
    print(f"docs-check: {pages} pages, {len(problems)} problems" +
          (f"; screenshots in {args.screenshots}/" if args.screenshots else ""))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
