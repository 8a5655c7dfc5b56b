"""The web console in a real browser (Debian's chromium, driven by Playwright; no browser
download), against a real `kiln serve` with a real template. Run by
crates/kiln-cli/tests/console_browser.rs, which provides:

  KILN_URL          the server, e.g. http://127.0.0.1:8080
  KILN_API_KEY      a team's key
  KILN_TEMPLATE     a template of that team that is ready (built by the Rust test)
  KILN_SCREENSHOTS  where to save a screenshot of each page
  KILN_CHROMIUM     the browser (default /usr/bin/chromium)

Every action is found by its accessible name, as a screen reader would find it. The
script fails on the first JavaScript error of any page.
"""

import json
import os
import re
import sys
import urllib.request

from playwright.sync_api import expect, sync_playwright

URL = os.environ["KILN_URL"].rstrip("/")
KEY = os.environ["KILN_API_KEY"]
TEMPLATE = os.environ["KILN_TEMPLATE"]
SHOTS = os.environ["KILN_SCREENSHOTS"]
CHROMIUM = os.environ.get("KILN_CHROMIUM", "/usr/bin/chromium")
# TCG: restores, pauses and builds are slow.
SLOW = 180_000


def api(method, path, body=None, headers=None):
    req = urllib.request.Request(URL + path, method=method,
                                 data=None if body is None else json.dumps(body).encode())
    req.add_header("X-API-Key", KEY)
    req.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    with urllib.request.urlopen(req, timeout=120) as r:
        data = r.read()
        return json.loads(data) if data else None


def main():
    os.makedirs(SHOTS, exist_ok=True)
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-quic",
                  # Preview URLs (`<port>-<id>.preview.localhost`) are kiln's own listener.
                  "--host-resolver-rules=MAP *.preview.localhost 127.0.0.1"],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(60_000)
        # Any uncaught exception or console error (CSP violations included) fails the run.
        allowed = []
        page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
        page.on("console", lambda m: m.type == "error" and not any(a in m.text for a in allowed)
                and errors.append(f"console: {m.text}"))

        def shot(name):
            page.screenshot(path=os.path.join(SHOTS, f"{name}.png"), full_page=True)
            assert not errors, errors

        # A wrong key: the API's error, with its code, and no way in.
        page.goto(URL + "/console")
        allowed.append("status of 401")
        page.get_by_label("API key").fill("kiln_wrong")
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("alert")).to_contain_text("unauthorized:")
        allowed.remove("status of 401")
        shot("01-sign-in-refused")

        page.get_by_label("API key").fill(KEY)
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("heading", name="Overview")).to_be_visible()
        # The key is in session storage only: not in the URL, not in local storage.
        assert KEY not in page.url
        assert page.evaluate("() => sessionStorage.getItem('kiln.apiKey')") == KEY
        assert page.evaluate("() => localStorage.length") == 0
        expect(page.get_by_text("Host capacity")).to_be_visible()
        shot("02-overview")

        # Templates: the list, the template, its build log with its streams.
        page.get_by_role("link", name="Templates").click()
        expect(page.get_by_role("link", name=TEMPLATE)).to_be_visible()
        shot("03-templates")
        page.get_by_role("link", name=TEMPLATE).click()
        expect(page.get_by_role("heading", name=TEMPLATE)).to_be_visible()
        log = page.get_by_label("Build log")
        expect(log.locator("[data-stream=system]").first).to_be_visible()
        expect(log.locator("[data-stream=stdout]").first).to_be_visible()
        expect(page.get_by_text("Build ready")).to_be_visible()
        shot("04-template")

        # The spec editor validates as it is typed, with kiln validate's messages.
        page.get_by_role("link", name="Edit spec").click()
        editor = page.get_by_label("Spec (the body of POST /templates)")
        expect(page.get_by_text("Valid", exact=True)).to_be_visible()
        spec = json.loads(editor.input_value())
        spec["vcpu"] = 99
        editor.fill(json.dumps(spec, indent=2))
        problems = page.get_by_role("list", name="Problems")
        expect(problems).to_contain_text("vcpu: ")
        expect(page.get_by_role("button", name="Build")).to_be_disabled()
        shot("05-spec-editor")

        # Create a sandbox from the template.
        page.get_by_role("link", name="Templates").click()
        page.get_by_role("link", name=TEMPLATE).click()
        page.get_by_role("button", name="Create sandbox").click()
        expect(page.get_by_role("button", name="Kill")).to_be_visible(timeout=SLOW)
        sandbox_id = page.url.rsplit("/", 1)[1]
        expect(page.get_by_text("active", exact=True)).to_be_visible()
        expect(page.get_by_role("heading", name="Network log")).to_be_visible()

        # Type into the terminal; the effect is visible through the API.
        terminal = page.get_by_role("textbox", name="Terminal")
        expect(page.get_by_text("Connected.")).to_be_visible(timeout=SLOW)
        terminal.press_sequentially("echo from-the-console-$((6*7)) > /tmp/console.txt; stty size\n")
        # The command ran when `stty size` has answered with the terminal's size.
        expect(page.locator(".xterm-rows")).to_contain_text(re.compile(r"\d{2,3} \d{2,3}"), timeout=SLOW)
        shot("06-sandbox-terminal")
        out = api("POST", "/exec", {"command": "cat /tmp/console.txt"},
                  {"X-Superserve-Sandbox-Id": sandbox_id})
        assert out["stdout"] == "from-the-console-42\n", out

        # The file browser shows it.
        page.get_by_label("Directory").fill("/tmp")
        page.get_by_role("button", name="Open").click()
        expect(page.get_by_role("button", name="Download console.txt")).to_be_visible()
        with page.expect_download() as dl:
            page.get_by_role("button", name="Download console.txt").click()
        with open(dl.value.path()) as f:
            assert f.read() == "from-the-console-42\n"

        # Preview URLs: a port published from the console is listed with its URL; a
        # private one's link opens a signed URL (the token never shows), which here finds
        # nothing listening on the port: the proxy's short 502 page.
        page.get_by_label("Preview port").fill("8000")
        page.get_by_label("Preview access").select_option("private")
        page.get_by_role("button", name="Publish").click()
        # No `/` in the pattern: Playwright writes a regex into its selector between
        # slashes, and one inside breaks its parser.
        link = page.get_by_role("link", name=re.compile(r"^http:\W\W8000-"))
        expect(link).to_be_visible()
        ports = api("GET", f"/sandboxes/{sandbox_id}/preview-ports")
        assert [(p["port"], p["access"]) for p in ports["ports"]] == [(8000, "private")], ports
        with page.context.expect_page() as opened:
            link.click()
        preview = opened.value
        expect(preview.get_by_text("nothing is listening on port 8000")).to_be_visible(timeout=SLOW)
        assert "kiln_preview_token" not in preview.url, preview.url
        preview.close()
        shot("06b-sandbox-previews")

        # Pause and resume.
        page.get_by_role("button", name="Pause").click()
        expect(page.get_by_role("button", name="Resume")).to_be_enabled(timeout=SLOW)
        expect(page.get_by_text("paused", exact=True)).to_be_visible()
        shot("07-sandbox-paused")
        assert api("GET", f"/sandboxes/{sandbox_id}")["status"] == "paused"
        page.get_by_role("button", name="Resume").click()
        expect(page.get_by_role("button", name="Pause")).to_be_enabled(timeout=SLOW)
        assert api("GET", f"/sandboxes/{sandbox_id}")["status"] == "active"

        # The sandbox list, filtered.
        page.get_by_role("link", name="Sandboxes").click()
        page.get_by_label("Status").select_option("active")
        page.get_by_role("button", name="Filter").click()
        expect(page.get_by_text(sandbox_id[:8])).to_be_visible()
        shot("08-sandboxes")

        # Kill it, with a confirmation.
        page.get_by_text(sandbox_id[:8]).locator("xpath=..").get_by_role("link").click()
        # Once the page has settled (its file listing and terminal are up): a kill cuts
        # off whatever is still talking to the sandbox.
        expect(page.get_by_role("button", name="..")).to_be_visible(timeout=SLOW)
        expect(page.get_by_text("Connected.")).to_be_visible(timeout=SLOW)
        page.get_by_role("button", name="Kill").click()
        page.get_by_role("button", name="Confirm").click()
        expect(page.get_by_role("heading", name="Sandboxes")).to_be_visible(timeout=SLOW)
        # A killed sandbox is gone from the API: 404.
        try:
            api("GET", f"/sandboxes/{sandbox_id}")
        except urllib.error.HTTPError as e:
            assert e.code == 404, e
        else:
            raise AssertionError("the killed sandbox still answers GET")

        # Sign out clears the key.
        page.get_by_role("button", name="Sign out").click()
        expect(page.get_by_label("API key")).to_be_visible()
        assert page.evaluate("() => sessionStorage.getItem('kiln.apiKey')") is None
        shot("09-signed-out")
        browser.close()
    if errors:
        print("\n".join(errors), file=sys.stderr)
        sys.exit(1)
    print("console browser test: passed")


if __name__ == "__main__":
    main()
