"""Opens a preview's signed URL in headless Chromium (Debian's, driven by Playwright; the
venv of scripts/browser-venv.sh) and checks what a user sees: the page of the web server
in the sandbox, at the clean URL (the token gone from it), a host cookie that holds the
token out of reach of scripts, and a reload that works with that cookie alone.

Run by tests/sdk/python/scenario.py (which has no Playwright of its own):

  python preview_browser.py SIGNED_URL EXPECTED_TEXT

KILN_CHROMIUM names the browser (default /usr/bin/chromium). Prints `browser: ok` or
exits 1 with what went wrong.
"""

import os
import sys
from urllib.parse import urlsplit

from playwright.sync_api import sync_playwright

COOKIE = "kiln_preview_token"


def main() -> int:
    url, expected = sys.argv[1], sys.argv[2]
    host = urlsplit(url).hostname
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=os.environ.get("KILN_CHROMIUM", "/usr/bin/chromium"),
            args=["--no-sandbox", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-quic",
                  # Chromium resolves *.localhost itself; say where, for IPv4-only listeners.
                  "--host-resolver-rules=MAP *.localhost 127.0.0.1"],
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(120_000)
            resp = page.goto(url)
            problems = []
            if resp is None or resp.status != 200:
                problems.append(f"status {resp and resp.status} at {page.url}")
            text = page.inner_text("body")
            if expected not in text:
                problems.append(f"page text {text[:300]!r} lacks {expected!r}")
            if COOKIE in page.url:
                problems.append(f"the token is still in the URL: {page.url}")
            cookies = [c for c in page.context.cookies() if c["name"] == COOKIE]
            if len(cookies) != 1:
                problems.append(f"cookies: {page.context.cookies()}")
            else:
                c = cookies[0]
                if not c["httpOnly"] or c["domain"] != host or c["sameSite"] != "Lax":
                    problems.append(f"cookie attributes: httpOnly={c['httpOnly']} "
                                    f"domain={c['domain']} sameSite={c['sameSite']}")
            if page.evaluate("() => document.cookie").find(COOKIE) >= 0:
                problems.append("the token cookie is readable from the page's scripts")
            page.reload()
            if expected not in page.inner_text("body"):
                problems.append("a reload (the cookie alone) did not show the page")
        finally:
            browser.close()
    if problems:
        print("browser: " + "; ".join(problems), flush=True)
        return 1
    print("browser: ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
