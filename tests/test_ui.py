"""The live monitor, ui.html, in a real browser (the machine's Chromium, headless, driven
by Playwright) against the real processes and database: served at /, opened from disk,
updating live, changing faults, running operator actions, and never treating data as
markup. Every wait is a Playwright expectation that polls; nothing sleeps.

`python tests/test_ui.py --update-csp` refreshes the script and style hashes in ui.html's
Content-Security-Policy after an edit."""

import base64
import hashlib
import os
import re
import shutil
import sys

import pytest
from playwright.sync_api import expect, sync_playwright

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UI = os.path.join(ROOT, "ui.html")
ARTIFACTS = os.path.join(ROOT, "test-artifacts")
DOC_SCREENSHOT = os.path.join(ROOT, "docs", "screenshot.png")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 25_000  # ceiling for one expectation; they return as soon as the page shows it
FAILED_LOAD = re.compile(r"Failed to load resource: (?:the server responded with a status of (\d+)|net::(\w+))")


# --- the Content-Security-Policy hashes -------------------------------------------------

def inline_block(html, tag):
    blocks = re.findall(rf"^<{tag}>(.*?)^</{tag}>$", html, re.S | re.M)
    assert len(blocks) == 1, f"ui.html must hold exactly one <{tag}> block"
    return blocks[0]


def sha256_source(text):
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def csp_of(html):
    match = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]*)">', html)
    assert match, "ui.html has no Content-Security-Policy meta tag"
    policy = {}
    for directive in match.group(1).split(";"):
        name, *values = directive.split()
        policy[name] = values
    return match, policy


def update_csp(path=UI):
    with open(path, encoding="utf-8") as f:
        html = f.read()
    match, policy = csp_of(html)
    policy["script-src"] = [sha256_source(inline_block(html, "script"))]
    policy["style-src"] = [sha256_source(inline_block(html, "style"))]
    content = "; ".join(" ".join([name, *values]) for name, values in policy.items())
    html = html[:match.start(1)] + content + html[match.end(1):]
    with open(path, "w", encoding="utf-8") as f:
        f.write(html)


def test_csp_allows_only_this_files_script_and_style():
    with open(UI, encoding="utf-8") as f:
        html = f.read()
    _, policy = csp_of(html)
    hint = "run: .venv/bin/python tests/test_ui.py --update-csp"
    assert policy["script-src"] == [sha256_source(inline_block(html, "script"))], hint
    assert policy["style-src"] == [sha256_source(inline_block(html, "style"))], hint
    assert policy["default-src"] == ["'none'"]
    assert policy["connect-src"] == ["http:", "https:"]  # the orchestrator may be anywhere
    assert policy["require-trusted-types-for"] == ["'script'"]
    assert "unsafe-inline" not in html and "unsafe-eval" not in html
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=\"(?!data:)", html), \
        "ui.html must load nothing from outside"
    assert ".innerHTML" not in html and "insertAdjacentHTML" not in html


# --- the browser ---------------------------------------------------------------------------

def find_chromium():
    candidates = [os.environ.get("SAGA_CHROMIUM"), "/usr/bin/chromium",
                  shutil.which("chromium"), shutil.which("chromium-browser"),
                  "/Applications/Chromium.app/Contents/MacOS/Chromium",
                  "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome"]
    return next((c for c in candidates if c and os.path.exists(c)), None)


@pytest.fixture(scope="session")
def browser():
    executable = find_chromium()
    if executable is None:
        pytest.skip("no Chromium found (./run.sh test installs it; or set SAGA_CHROMIUM)")
    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Monitor:
    """One browser tab on ui.html, recording what must not happen: console errors,
    uncaught exceptions, dialogs (an injected alert() would open one)."""

    def __init__(self, context, name):
        self.context, self.name = context, name
        self.page = context.new_page()
        self.page.set_default_timeout(WAIT_MS)
        self.console_errors, self.page_errors, self.dialogs, self.requests = [], [], [], []
        self.allowed = []  # (path, status): 4xx/5xx answers a test asked for on purpose
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda exc: self.page_errors.append(str(exc)))
        self.page.on("dialog", self._dialog)
        self.page.on("request", lambda req: self.requests.append(req.url))

    def _console(self, msg):
        if msg.type != "error":
            return
        found = FAILED_LOAD.search(msg.text)
        url = (msg.location or {}).get("url", "")
        code, net_error = found.groups() if found else (None, None)
        if found and any(path in url and (code == str(status) or (net_error and status == "net"))
                         for path, status in self.allowed):
            return
        self.console_errors.append(f"{msg.text} ({url})")

    def _dialog(self, dialog):
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def allow_http_error(self, path, status):
        """Chromium logs every 4xx/5xx fetch answer (and every refused connection) as a
        console error; a test that asks for one (a 409 from /start for a compensated
        saga; status "net": any network error, while it kills the orchestrator) says so."""
        self.allowed.append((path, status))

    def open(self, url):
        self.page.goto(url)
        expect(self.page.locator("#conn")).to_have_text("live")
        return self.page

    def shot(self, name=None):
        os.makedirs(ARTIFACTS, exist_ok=True)
        path = os.path.join(ARTIFACTS, f"{name or self.name}.png")
        self.page.screenshot(path=path)
        return path

    def assert_clean(self):
        assert self.console_errors == [], self.console_errors
        assert self.page_errors == [], self.page_errors
        assert self.dialogs == [], self.dialogs


@pytest.fixture
def ui(browser, request):
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    monitor = Monitor(context, request.node.name)
    yield monitor
    try:
        monitor.shot()
    finally:
        context.close()


# --- helpers over the page ------------------------------------------------------------------

def row(page, saga_id):
    return page.locator(f'#saga-rows tr[data-id="{saga_id}"]')


def status_of(locator, status):
    expect(locator.locator(".badge").first).to_have_text(re.compile(rf"{status}$"))


def start_from_page(page, username=None, address=None, payment=None):
    for label, value in (("Username", username), ("Address", address), ("Payment", payment)):
        if value is not None:
            page.get_by_label(label, exact=True).fill(value)
    page.get_by_role("button", name="Start saga").click()
    result = page.locator("#start-result")
    expect(page.locator("#start-pending")).to_be_hidden()
    expect(result).not_to_contain_text("Starting")
    return result


def started_id(page):
    return page.locator("#start-result button.mono").text_content()


def card(page, lane, service):
    return page.locator(f'#lane-{lane} li[data-service="{service}"]')


def fault_form(page, service):
    return page.get_by_role("form", name=f"Failure simulation for service {service}")


# --- the tests ------------------------------------------------------------------------------

def test_served_page_shows_a_completed_saga_and_its_timeline(live_system, ui):
    page = ui.open(live_system.url + "/")
    expect(page.locator("#api")).to_have_text(live_system.url)
    sid = live_system.start().json()["saga"]  # started elsewhere: the page finds it by polling

    saga_row = row(page, sid)
    expect(saga_row).to_contain_text("john_doe")
    status_of(saga_row, "COMPLETED")
    saga_row.click()
    expect(page.locator("#detail-id")).to_have_text(sid)
    status_of(page.locator("#detail-badge"), "COMPLETED")
    expect(page.locator("#lane-forward > li")).to_have_count(3)
    for service in "ABC":
        step = card(page, "forward", service)
        expect(step).to_have_attribute("data-status", "success")
        expect(step).to_contain_text(re.compile(r"HTTP 200 · \d+ ms · 1 attempt"))
    expect(page.locator("#lane-comp-note")).to_have_text("None: every step committed.")
    expect(page.locator("#compensate")).to_be_visible()
    expect(page.locator("#retry")).to_be_hidden()
    # The live tail has the saga's whole story, once each.
    expect(page.locator(f'#log-rows tr[data-saga="{sid}"]')).to_have_count(len(live_system.log(sid)))
    # The health panel sees all four processes and the database.
    expect(page.locator("#h-orch")).to_have_text("ok")
    expect(page.locator("#h-db")).to_have_text("up")
    for service in "ABC":
        expect(fault_form(page, service).locator("xpath=..").locator(".svc-head .badge")).to_have_text("ok")
    ui.assert_clean()


def test_page_opened_from_disk_talks_to_the_api_named_by_the_query(live_system, ui):
    page = ui.open(f"file://{UI}?api={live_system.url}")
    expect(page.locator("#api")).to_have_text(live_system.url)
    result = start_from_page(page, username="from_disk")
    expect(result).to_contain_text("COMPLETED")
    expect(result).to_contain_text("HTTP 200")
    sid = started_id(page)
    assert live_system.saga_row(sid)[0] == "COMPLETED"
    assert live_system.query("SELECT username FROM TABLE_A WHERE saga_id = %s", (sid,)) == [("from_disk",)]
    status_of(row(page, sid), "COMPLETED")
    expect(page.locator("#detail-id")).to_have_text(sid)  # the saga just started is shown
    # Cross-origin from file://: a PUT with a JSON body (preflighted) works too.
    form = fault_form(page, "A")
    form.get_by_label("Mode").select_option("slow")
    form.get_by_label("Sleep").fill("0.05")
    form.get_by_role("button", name="Apply").click()
    expect(form.locator(".msg")).to_have_text("applied")
    assert live_system.get("/faults").json()["A"]["fault"] == {"mode": "slow", "on": "invoke", "every": 1,
                                                        "seconds": 0.05}
    ui.assert_clean()
    # The policy holds from disk too: markup cannot be built from a string.
    assert page.evaluate("""() => { try { document.body.innerHTML = '<b>x</b>'; return 'assigned'; }
                                    catch (e) { return e.name; } }""") == "TypeError"
    assert [e for e in ui.console_errors if "requires 'TrustedHTML' assignment" in e]


def test_saga_compensated_while_the_page_is_open_appears_live(live_system, ui):
    page = ui.open(live_system.url + "/")
    page.evaluate("window.stillTheSamePage = true")
    live_system.set_fault("C", mode="reject")
    resp = live_system.start({"username": "undone_live", "address": "1 Undo Rd", "payment": "Visa"})
    assert resp.status_code == 409, resp.text
    sid = resp.json()["saga"]

    saga_row = row(page, sid)
    status_of(saga_row, "COMPENSATED")
    expect(saga_row).to_contain_text("undone after C")
    expect(saga_row).to_contain_text("C rejected")
    saga_row.locator("button").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#detail-id")).to_have_text(sid)
    expect(card(page, "forward", "C")).to_have_attribute("data-status", "rejected")
    expect(card(page, "forward", "C")).to_contain_text("HTTP 422")
    comp = page.locator("#lane-comp > li")
    expect(comp).to_have_count(3)
    assert comp.evaluate_all("cards => cards.map(c => c.dataset.service)") == ["C", "B", "A"]
    # C refused, so it wrote nothing and is not undone; B and A are.
    expect(card(page, "comp", "C")).not_to_have_attribute("data-status", "success")
    for service in "BA":
        expect(card(page, "comp", service)).to_have_attribute("data-status", "success")
        expect(card(page, "comp", service)).to_contain_text("HTTP 200")
    expect(card(page, "comp", "A")).to_contain_text("compensated (rows removed: 1)")
    expect(page.locator("#compensate")).to_be_hidden()
    page.get_by_text("This saga's log").click()
    expect(page.locator("#detail-log > tr")).to_have_count(len(live_system.log(sid)))
    expect(page.locator("#detail-log > tr").last).to_contain_text("every step undone")
    assert page.evaluate("window.stillTheSamePage") is True  # updated in place, never reloaded
    ui.shot("compensated-timeline")
    ui.assert_clean()


def test_fault_set_from_the_page_changes_the_next_sagas_outcome(live_system, ui):
    page = ui.open(live_system.url + "/")
    form = fault_form(page, "C")
    form.get_by_label("Mode").select_option("reject")
    form.get_by_role("button", name="Apply").click()
    expect(form.locator(".msg")).to_have_text("applied")
    expect(page.locator("#fault-C-h").locator("xpath=../..")).to_contain_text(
        "Fault: reject on invoke, every call")
    assert live_system.get("/faults").json()["C"]["fault"]["mode"] == "reject"

    ui.allow_http_error("/start", 409)
    result = start_from_page(page, username="meets_a_no")
    expect(result).to_contain_text("COMPENSATED")
    expect(result).to_contain_text("HTTP 409")
    expect(result).to_contain_text("C rejected")
    sid = started_id(page)
    assert live_system.row_counts(sid) == {"TABLE_A": 0, "TABLE_B": 0, "TABLE_C": 0}

    form.get_by_role("button", name="Turn off").click()
    expect(page.locator("#fault-C-h").locator("xpath=../..")).to_contain_text("Fault: off")
    assert live_system.get("/faults").json()["C"]["fault"]["mode"] == "off"
    result = start_from_page(page, username="meets_a_yes")
    expect(result).to_contain_text("COMPLETED")
    assert live_system.row_counts(started_id(page)) == {"TABLE_A": 1, "TABLE_B": 1, "TABLE_C": 1}
    ui.assert_clean()


def test_fault_form_shows_the_services_validation_message(live_system, ui):
    page = ui.open(live_system.url + "/")
    form = fault_form(page, "A")
    form.get_by_label("Mode").select_option("fail")
    form.get_by_label("When").select_option("rate")
    form.get_by_label("Trigger value").fill("2")
    ui.allow_http_error("/faults/A", 400)
    form.get_by_role("button", name="Apply").click()
    expect(form.locator(".msg")).to_have_text("rate must be a number from 0 to 1 [field: rate]")
    assert live_system.get("/faults").json()["A"]["fault"]["mode"] == "off"
    ui.assert_clean()


def test_markup_typed_as_a_username_is_shown_as_text_and_runs_nothing(live_system, ui):
    hostile = "<img src=x onerror=alert(1)>"
    address = "<script>alert(2)</script>"
    page = ui.open(live_system.url + "/")
    result = start_from_page(page, username=hostile, address=address)
    expect(result).to_contain_text("COMPLETED")
    sid = started_id(page)
    expect(row(page, sid).locator("td.user")).to_have_text(hostile)
    expect(page.locator("#detail-facts")).to_contain_text(hostile)
    expect(page.locator("#detail-facts")).to_contain_text(address)
    expect(page.get_by_text(hostile, exact=True).first).to_be_visible()
    expect(page.locator("img")).to_have_count(0)
    assert page.locator("script").count() == 1  # only the page's own
    assert not [url for url in ui.requests if url.endswith("/x")], "the <img> was parsed"
    assert live_system.get(f"/sagas/{sid}").json()["input"]["username"] == hostile
    ui.assert_clean()  # no alert() dialog, no console error


def test_bad_input_shows_the_apis_message_and_marks_the_field(live_system, ui):
    page = ui.open(live_system.url + "/")
    ui.allow_http_error("/start", 400)
    start_from_page(page, username="   ")
    expect(page.locator("#start-error")).to_have_text("username must not be empty [field: username]")
    username = page.get_by_label("Username", exact=True)
    expect(username).to_have_attribute("aria-invalid", "true")
    expect(username).to_be_focused()
    assert live_system.query("SELECT COUNT(*) FROM SAGA")[0][0] == 0
    ui.assert_clean()


def test_list_updates_in_place_keeps_the_selection_and_filters_by_status(live_system, ui):
    page = ui.open(live_system.url + "/")
    first = live_system.start({"username": "first", "address": "1 St", "payment": "Visa"}).json()["saga"]
    first_row = row(page, first)
    status_of(first_row, "COMPLETED")
    first_row.click()
    expect(first_row).to_have_class(re.compile(r"\bselected\b"))
    first_row.evaluate("tr => { tr.sameNode = true; }")

    live_system.set_fault("B", mode="reject")
    second = live_system.start({"username": "second", "address": "2 St", "payment": "Visa"}).json()["saga"]
    status_of(row(page, second), "COMPENSATED")
    rows = page.locator("#saga-rows > tr")
    assert rows.evaluate_all("trs => trs.map(tr => tr.dataset.id)") == [second, first]  # newest first
    assert first_row.evaluate("tr => tr.sameNode") is True  # the row was updated, not rebuilt
    expect(first_row).to_have_class(re.compile(r"\bselected\b"))
    expect(page.locator("#detail-id")).to_have_text(first)

    page.get_by_label("Status", exact=True).select_option("COMPENSATED")
    expect(rows).to_have_count(1)
    expect(row(page, second)).to_be_visible()
    expect(page.locator("#detail-id")).to_have_text(first)  # the selection survives a filter
    page.get_by_label("Status", exact=True).select_option("")
    expect(rows).to_have_count(2)
    expect(first_row).to_have_class(re.compile(r"\bselected\b"))

    # Keyboard: arrows move the selection between sagas.
    first_row.locator("button").focus()
    page.keyboard.press("ArrowUp")
    expect(page.locator("#detail-id")).to_have_text(second)
    expect(row(page, second).locator("button")).to_be_focused()
    expect(card(page, "forward", "B")).to_have_attribute("data-status", "rejected")
    expect(card(page, "forward", "C")).to_have_attribute("data-status", "not run")
    expect(card(page, "comp", "C")).to_have_attribute("data-status", "not needed")
    ui.assert_clean()


def test_failed_saga_is_retried_and_a_completed_one_compensated_from_the_page(live_system, ui):
    # C says no and B's compensation keeps failing past SAGA_COMPENSATE_FOR: FAILED.
    live_system.set_fault("C", mode="reject")
    live_system.set_fault("B", mode="fail", on="compensate")
    resp = live_system.start({"username": "stuck", "address": "3 St", "payment": "Visa"})
    assert resp.status_code == 502, resp.text
    stuck = resp.json()["saga"]
    assert live_system.saga_row(stuck)[0] == "FAILED"

    page = ui.open(live_system.url + "/")
    row(page, stuck).click()
    status_of(page.locator("#detail-badge"), "FAILED")
    expect(card(page, "comp", "B")).to_have_attribute("data-status", "failed")
    expect(card(page, "comp", "B")).to_contain_text("HTTP 500")
    expect(card(page, "comp", "B").locator(".attempts li").last).to_contain_text(
        re.compile(r"#\d+ failed · HTTP 500"))
    expect(page.locator("#compensate")).to_be_visible()
    ui.shot("failed-timeline")
    live_system.set_fault("B", mode="off")
    page.get_by_role("button", name="Retry compensation").click()
    expect(page.locator("#action-msg")).to_contain_text("Now COMPENSATED")
    status_of(row(page, stuck), "COMPENSATED")
    expect(card(page, "comp", "B")).to_have_attribute("data-status", "success")
    assert live_system.row_counts(stuck) == {"TABLE_A": 0, "TABLE_B": 0, "TABLE_C": 0}

    live_system.set_fault("C", mode="off")
    done = live_system.start().json()["saga"]
    row(page, done).click()
    status_of(page.locator("#detail-badge"), "COMPLETED")
    page.get_by_role("button", name="Compensate…").click()
    expect(page.locator("#confirm")).to_be_visible()
    page.get_by_role("button", name="Yes, compensate").click()
    expect(page.locator("#action-msg")).to_contain_text("Now COMPENSATED")
    status_of(row(page, done), "COMPENSATED")
    for service in "CBA":
        expect(card(page, "comp", service)).to_have_attribute("data-status", "success")
    assert live_system.row_counts(done) == {"TABLE_A": 0, "TABLE_B": 0, "TABLE_C": 0}
    ui.assert_clean()


def test_operator_actions_ask_for_the_token_when_one_is_set(make_system, ui):
    system = make_system(SAGA_API_TOKEN="s3cret-token")
    page = ui.open(system.url + "/")
    form = fault_form(page, "A")
    form.get_by_label("Mode").select_option("fail")
    ui.allow_http_error("/faults/A", 401)
    form.get_by_role("button", name="Apply").click()
    expect(form.locator(".msg")).to_contain_text("needs the operator token")
    expect(page.get_by_label("Operator token")).to_be_focused()

    page.get_by_label("Operator token").fill("s3cret-token")
    form.get_by_role("button", name="Apply").click()
    expect(form.locator(".msg")).to_have_text("applied")
    assert system.get("/faults").json()["A"]["fault"]["mode"] == "fail"
    assert page.evaluate("sessionStorage.getItem('saga-monitor-token')") == "s3cret-token"
    assert page.evaluate("localStorage.length") == 0  # never kept beyond the tab
    ui.assert_clean()


def test_page_says_when_the_orchestrator_is_down_and_recovers_by_itself(live_system, ui):
    page = ui.open(live_system.url + "/")
    ui.allow_http_error(live_system.url + "/", "net")  # refused, or cut off mid-answer
    live_system.system.kill("orchestrator")
    expect(page.locator("#conn")).to_have_text(f"cannot reach the orchestrator at {live_system.url}; retrying")
    expect(page.locator("#h-orch")).to_have_text("down")
    live_system.system.start("orchestrator")
    expect(page.locator("#conn")).to_have_text("live")
    sid = live_system.start().json()["saga"]
    status_of(row(page, sid), "COMPLETED")
    expect(page.locator("#h-orch")).to_have_text("ok")
    ui.assert_clean()


def test_screenshot_of_a_busy_monitor(live_system, ui):
    """Not a promise but a picture: a few completed and compensated sagas, the seed's
    failure pattern, one timeline selected. Saved to test-artifacts/; with
    SAGA_UPDATE_SCREENSHOT=1 also to docs/screenshot.png for the README."""
    page = ui.open(live_system.url + "/")
    live_system.set_fault("A", mode="fail", every=2)
    live_system.set_fault("B", mode="crash", every=2)
    people = [("john_doe", "123 Main St", "Visa"), ("ada", "12 Analytical Way", "Mastercard"),
              ("grace", "1 Compiler Ct", "Amex"), ("linus", "4 Kernel Rd", "Visa")]
    for username, address, payment in people:
        live_system.start({"username": username, "address": address, "payment": payment})
    live_system.set_fault("C", mode="reject", next=1)
    undone = live_system.start({"username": "mallory", "address": "7 Nowhere St",
                         "payment": "expired card"}).json()["saga"]
    live_system.start({"username": "zoë", "address": "Straße 1", "payment": "Visa"})
    live_system.set_fault("C", mode="reject", next=1)
    live_system.start({"username": "eve", "address": "9 Side St", "payment": "Visa"})
    live_system.set_fault("C", mode="off")
    expect(page.locator("#fault-C-h").locator("xpath=../..")).to_contain_text("Fault: off")
    expect(page.locator("#saga-rows > tr")).to_have_count(7)
    expect(page.locator("#saga-rows > tr.flash")).to_have_count(0)
    row(page, undone).click()
    expect(page.locator("#lane-comp > li")).to_have_count(3)
    expect(card(page, "comp", "A")).to_have_attribute("data-status", "success")
    expect(page.locator("#fault-B-h").locator("xpath=../..")).to_contain_text("crash")
    page.mouse.move(0, 0)
    path = ui.shot("monitor")
    if os.environ.get("SAGA_UPDATE_SCREENSHOT"):
        os.makedirs(os.path.dirname(DOC_SCREENSHOT), exist_ok=True)
        shutil.copyfile(path, DOC_SCREENSHOT)
    ui.assert_clean()


if __name__ == "__main__":
    if sys.argv[1:] == ["--update-csp"]:
        update_csp()
        print("updated the Content-Security-Policy hashes in", UI)
    else:
        sys.exit(__doc__)
