"""The live monitor, ui.html, in a real browser (the machine's Chromium, headless, driven
by Playwright) against the real processes and database: served at /, opened from disk,
updating live, starting registrations and transfers, showing balances, timelines of any
saga type and a choreographed saga's event flow, a saga as a sequence diagram in every
mode and transport, tailing SAGA_LOG without losing a late row, describing services and
fault modes as the orchestrator does, changing faults, running operator actions, and never treating data as markup. Every
wait is a Playwright expectation that polls; nothing sleeps.

`python tests/test_ui.py --update-csp` refreshes the script and style hashes in ui.html's
Content-Security-Policy after an edit."""

import base64
import hashlib
import os
import re
import shutil
import sys
from datetime import datetime

import pytest
from playwright.sync_api import expect, sync_playwright

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UI = os.path.join(ROOT, "ui.html")
ARTIFACTS = os.path.join(ROOT, "test-artifacts")
DOC_SCREENSHOT = os.path.join(ROOT, "docs", "screenshot.png")
DOC_SEQUENCE = os.path.join(ROOT, "docs", "sequence.png")
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


def start_form(page, saga_type):
    """The start form the page built for a saga type from GET /saga-types."""
    return page.locator(f"#start-{saga_type}")


def start_from_form(page, saga_type, values=(), double_click=False):
    """Fill a type's start form by its labels (a select by its option; a value None keeps
    what the form holds) and press "Start <type>"; the result once the answer shows."""
    form = start_form(page, saga_type)
    for label, value in dict(values).items():
        if value is None:
            continue
        field = form.get_by_label(label, exact=True)
        if field.evaluate("e => e.tagName") == "SELECT":
            field.select_option(value)
        else:
            field.fill(value)
    button = form.get_by_role("button", name=f"Start {saga_type}", exact=True)
    button.dblclick() if double_click else button.click()
    result = page.locator(f"#{saga_type}-result")
    expect(page.locator(f"#{saga_type}-pending")).to_be_hidden()
    expect(result).not_to_contain_text("Starting")
    return result


def start_from_page(page, username=None, address=None, payment=None):
    return start_from_form(page, "registration",
                           {"Username": username, "Address": address, "Payment": payment})


def started_id(page, form="registration"):
    return page.locator(f"#{form}-result button.mono").text_content()


def status_filter(page):
    """The saga list's status filter (the order form has a field labelled Status too)."""
    return page.locator("#sagas").get_by_label("Status", exact=True)


def card(page, lane, service):
    return page.locator(f'#lane-{lane} li[data-service="{service}"]')


def step_card(page, lane, step):
    return page.locator(f'#lane-{lane} li[data-step="{step}"]')


def skipped(page, step):
    """The note saying why a step of an undone saga was not undone."""
    return page.locator(f'#lane-skips li[data-step="{step}"]')


def fact(page, name):
    return page.locator("#detail-facts dt").filter(has_text=re.compile(f"^{name}$")).locator(
        "xpath=following-sibling::dd[1]")


def balance(page, account):
    return page.locator(f"#bal-{account}")


def transfer_from_page(page, source=None, target=None, amount=None, double_click=False):
    return start_from_form(page, "transfer", {"From": source, "To": target, "Amount": amount},
                           double_click=double_click)


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
    # C refused, so it wrote nothing: the compensation lane undoes B then A, and says why
    # C was left alone.
    comp = page.locator("#lane-comp > li")
    expect(comp).to_have_count(2)
    assert comp.evaluate_all("cards => cards.map(c => c.dataset.service)") == ["B", "A"]
    expect(skipped(page, "C")).to_have_text("C skipped — refused: wrote nothing")
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
    expect(page.locator("#registration-error")).to_have_text("username must not be empty [field: username]")
    username = page.get_by_label("Username", exact=True)
    expect(username).to_have_attribute("aria-invalid", "true")
    expect(username).to_have_attribute("aria-describedby", "registration-error")
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

    status_filter(page).select_option("COMPENSATED")
    expect(rows).to_have_count(1)
    expect(row(page, second)).to_be_visible()
    expect(page.locator("#detail-id")).to_have_text(first)  # the selection survives a filter
    status_filter(page).select_option("")
    expect(rows).to_have_count(2)
    expect(first_row).to_have_class(re.compile(r"\bselected\b"))

    # Keyboard: arrows move the selection between sagas.
    first_row.locator("button").focus()
    page.keyboard.press("ArrowUp")
    expect(page.locator("#detail-id")).to_have_text(second)
    expect(row(page, second).locator("button")).to_be_focused()
    expect(card(page, "forward", "B")).to_have_attribute("data-status", "rejected")
    expect(card(page, "forward", "C")).to_have_attribute("data-status", "not run")
    # Only A wrote something: B refused and C was never reached, so only A is undone.
    expect(page.locator("#lane-comp > li")).to_have_count(1)
    expect(card(page, "comp", "A")).to_have_attribute("data-status", "success")
    expect(skipped(page, "B")).to_contain_text("refused: wrote nothing")
    expect(skipped(page, "C")).to_contain_text("not reached")
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


OPENING = {"A": "1000.00", "B": "500.00", "C": "250.00"}


def expect_balances(page, balances, total="1750.00"):
    for account, amount in balances.items():
        expect(balance(page, account)).to_have_text(amount)
    expect(page.locator("#bal-total")).to_have_text(total)


def test_transfer_from_the_page_completes_once_and_the_balances_follow_live(live_system, ui):
    page = ui.open(live_system.url + "/")
    expect_balances(page, OPENING)
    # A slow credit keeps the first request open while the second click of a double-click
    # goes out: it carries the same Idempotency-Key, so the transfer happens once.
    live_system.set_fault("B", mode="slow", seconds=0.5, next=1)
    keys = []
    page.on("request", lambda req: keys.append(req.headers.get("idempotency-key"))
            if req.method == "POST" and req.url.endswith("/transfer") else None)
    result = transfer_from_page(page, "A", "B", "100", double_click=True)
    expect(result).to_contain_text("COMPLETED")
    expect(result).to_contain_text("HTTP 200")
    sid = started_id(page, "transfer")
    assert len(keys) == 2 and keys[0] == keys[1] and keys[0].startswith("ui-"), keys
    assert live_system.query("SELECT id FROM SAGA") == [(sid,)]
    expect_balances(page, {"A": "900.00", "B": "600.00", "C": "250.00"})

    saga_row = row(page, sid)
    status_of(saga_row, "COMPLETED")
    expect(saga_row.locator("td.label")).to_have_text("A→B 100.00")
    expect(saga_row.locator("td.type .tag")).to_have_text(["transfer", "orchestration"])
    expect(page.locator("#detail-id")).to_have_text(sid)
    for name, value in (("From", "A"), ("To", "B"), ("Amount", "100.00")):
        expect(fact(page, name)).to_have_text(value)
    expect(step_card(page, "forward", "debit")).to_have_attribute("data-status", "success")
    expect(step_card(page, "forward", "credit")).to_have_attribute("data-status", "success")
    expect(page.locator("#compensate")).to_be_hidden()  # past its pivot: it cannot be undone
    expect(page.locator("#action-note")).to_have_text(
        "Past its pivot (credit): it only goes forward, it cannot be undone.")

    # Live: a transfer made elsewhere moves the balances of the open page.
    assert live_system.transfer({"from": "C", "to": "A", "amount": "50"}).status_code == 200
    expect_balances(page, {"A": "950.00", "B": "600.00", "C": "200.00"})
    live_system.assert_money_conserved()
    ui.assert_clean()


def test_insufficient_funds_shows_the_reason_and_moves_no_money(live_system, ui):
    page = ui.open(live_system.url + "/")
    ui.allow_http_error("/transfer", 409)
    result = transfer_from_page(page, "C", "A", "250.01")
    expect(result).to_contain_text("COMPENSATED")
    expect(result).to_contain_text("HTTP 409")
    expect(result).to_contain_text("insufficient funds")
    sid = started_id(page, "transfer")
    expect(page.locator("#detail-id")).to_have_text(sid)
    expect(step_card(page, "forward", "debit")).to_have_attribute("data-status", "rejected")
    expect(step_card(page, "forward", "credit")).to_have_attribute("data-status", "not run")
    # The debit was refused, so it wrote nothing: nothing to undo, and each step says why.
    expect(page.locator("#lane-comp > li")).to_have_count(0)
    expect(page.locator("#comp-flow")).to_have_text("nothing to undo")
    expect(skipped(page, "debit")).to_have_text("debit at C skipped — refused: wrote nothing")
    expect(skipped(page, "credit")).to_have_text("credit at A skipped — not reached")
    expect(row(page, sid).locator(".why")).to_contain_text("insufficient funds")
    expect_balances(page, OPENING)
    assert live_system.balances() == {"A": 1000, "B": 500, "C": 250}
    ui.assert_clean()


def test_bad_transfer_shows_the_apis_message_on_the_field(live_system, ui):
    page = ui.open(live_system.url + "/")
    ui.allow_http_error("/transfer", 400)
    for body, label in (({"amount": "12.345"}, "Amount"), ({"from": "B", "to": "B", "amount": "5"}, "To")):
        expected = live_system.transfer(body).json()  # the API's own words, asked directly
        assert expected["field"] == label.lower()
        transfer_from_page(page, body.get("from", "A"), body.get("to", "B"), body["amount"])
        expect(page.locator("#transfer-error")).to_have_text(f"{expected['error']} [field: {expected['field']}]")
        field = page.get_by_label(label, exact=True)
        expect(field).to_have_attribute("aria-invalid", "true")
        expect(field).to_have_attribute("aria-describedby", "transfer-error")
        expect(field).to_be_focused()
    expect(page.get_by_label("Amount", exact=True)).not_to_have_attribute("aria-invalid", "true")
    assert live_system.query("SELECT COUNT(*) FROM SAGA")[0][0] == 0
    ui.assert_clean()


def test_type_filter_shows_one_saga_type(live_system, ui):
    registration = live_system.start().json()["saga"]
    transfer = live_system.transfer({"from": "B", "to": "C", "amount": "12.5"}).json()["saga"]
    page = ui.open(live_system.url + "/")
    rows = page.locator("#saga-rows > tr")
    expect(rows).to_have_count(2)
    expect(row(page, registration).locator("td.label")).to_have_text("john_doe")
    expect(row(page, registration).locator("td.type .tag")).to_have_text(["registration", "orchestration"])
    expect(row(page, transfer).locator("td.label")).to_have_text("B→C 12.50")

    type_filter = page.get_by_label("Type", exact=True)
    type_filter.select_option("transfer")
    expect(rows).to_have_count(1)
    expect(row(page, transfer)).to_be_visible()
    expect(page.locator("#sagas-count")).to_have_text("type transfer")
    type_filter.select_option("registration")
    expect(rows).to_have_count(1)
    expect(row(page, registration)).to_be_visible()
    status_filter(page).select_option("COMPENSATED")
    expect(rows).to_have_count(0)
    expect(page.locator("#sagas-empty")).to_have_text("No registration COMPENSATED sagas.")
    status_filter(page).select_option("")
    type_filter.select_option("")
    expect(rows).to_have_count(2)
    ui.assert_clean()


def rgb(colour):
    """"#d97706" as the browser's computed style says it: "rgb(217, 119, 6)"."""
    return "rgb({}, {}, {})".format(*(int(colour[i:i + 2], 16) for i in (1, 3, 5)))


def view_row(page, view, **attrs):
    """A row of a view's table (the order's orders or customers), by its data attributes."""
    selector = "".join(f'[data-{k}="{v}"]' for k, v in attrs.items())
    return page.locator(f"#view-order-{view} tbody tr{selector}")


def test_page_builds_one_start_form_per_registered_saga_type(live_system, ui):
    types = live_system.get("/saga-types").json()["saga_types"]
    assert [t["name"] for t in types] == ["registration", "transfer", "order"]
    colours = {t["name"]: t["colour"] for t in types}
    registration = live_system.start().json()["saga"]
    page = ui.open(live_system.url + "/")

    expect(page.locator(".side .start-panel h2")).to_have_text(
        ["Start a registration", "Start a transfer", "Start an order"])
    for t in types:
        form = start_form(page, t["name"])
        expect(form.locator("label")).to_have_text(
            [f["name"].replace("_", " ").capitalize() for f in t["fields"]])
        expect(form.get_by_role("button", name=f"Start {t['name']}", exact=True)).to_be_visible()
    # The order's fields: text inputs filled from its example, a select for its choice.
    order = start_form(page, "order")
    expect(order.locator("label")).to_have_text(
        ["Customer id", "Product id", "Quantity", "Total price", "Status"])
    for label, value in (("Customer id", "1"), ("Product id", "1"), ("Quantity", "1"),
                         ("Total price", "50.00")):
        field = order.get_by_label(label, exact=True)
        expect(field).to_have_value(value)
        expect(field).to_have_attribute("type", "text")
    expect(page.locator("#f-order-quantity")).to_have_attribute("inputmode", "numeric")
    status = order.get_by_label("Status", exact=True)
    assert status.evaluate("e => e.tagName") == "SELECT"
    expect(status.locator("option")).to_have_text(["pending"])
    expect(status).to_have_value("pending")
    # The transfer's choices: every account, its defaults chosen.
    transfer = start_form(page, "transfer")
    expect(transfer.get_by_label("From", exact=True).locator("option")).to_have_text(["A", "B", "C"])
    expect(transfer.get_by_label("From", exact=True)).to_have_value("A")
    expect(transfer.get_by_label("To", exact=True)).to_have_value("B")
    expect(transfer.get_by_label("Amount", exact=True)).to_have_value("100.00")
    # Every registered type in the type filter, and its tags in the type's own colour.
    expect(page.get_by_label("Type", exact=True).locator("option")).to_have_text(
        ["all", "registration", "transfer", "order"])
    tag = row(page, registration).locator("td.type .tag").first
    expect(tag).to_have_text("registration")
    expect(tag).to_have_css("border-top-color", rgb(colours["registration"]))
    # The order's views beside the balances, before any order.
    expect(page.locator("#views-h")).to_have_text("Orders and customers")
    expect(page.locator("#view-order-customers thead th")).to_have_text(["Id", "Balance"])
    expect(page.locator("#view-order-customers tbody tr")).to_have_text(
        [re.compile(r"^1\s*500\.00$"), re.compile(r"^2\s*100\.00$"), re.compile(r"^3\s*0\.00$")])
    expect(page.locator('#views .view[data-view="orders"] .empty')).to_have_text("No orders yet.")
    ui.assert_clean()


def test_order_from_the_page_completes_or_is_refused_and_the_views_follow(live_system, ui):
    page = ui.open(live_system.url + "/")
    expect(view_row(page, "customers", id=1).locator("td")).to_have_text(["1", "500.00"])

    result = start_from_form(page, "order")  # its example: customer 1, 1 × product 1, 50.00
    expect(result).to_contain_text("COMPLETED")
    expect(result).to_contain_text("HTTP 200")
    sid = started_id(page, "order")
    assert live_system.saga_row(sid)[0] == "COMPLETED"
    (order_id,), = live_system.query("SELECT id FROM ORDERS WHERE saga_id = %s", (sid,))
    saga_row = row(page, sid)
    status_of(saga_row, "COMPLETED")
    expect(saga_row.locator("td.type .tag")).to_have_text(["order", "orchestration"])
    colour = live_system.get("/saga-types").json()["saga_types"][2]["colour"]
    expect(saga_row.locator("td.type .tag").first).to_have_css("border-top-color", rgb(colour))
    expect(page.locator("#detail-id")).to_have_text(sid)
    expect(fact(page, "Customer id")).to_have_text("1")
    expect(page.locator("#view-order-orders thead th")).to_have_text(
        ["Id", "Customer", "Product", "Quantity", "Total price", "Status"])
    expect(view_row(page, "orders", saga=sid).locator("td")).to_have_text(
        [str(order_id), "1", "1", "1", "50.00", "FULFILLED"])
    expect(view_row(page, "customers", id=1).locator("td")).to_have_text(["1", "450.00"])

    # Customer 3 holds 0.00: B refuses the charge and A rejects the order.
    ui.allow_http_error("/sagas/start", 409)
    result = start_from_form(page, "order", {"Customer id": "3"})
    expect(result).to_contain_text("COMPENSATED")
    expect(result).to_contain_text("HTTP 409")
    expect(result).to_contain_text(re.compile(r"Reason: .*insufficient balance"))
    refused = started_id(page, "order")
    assert refused != sid and live_system.saga_row(refused)[0] == "COMPENSATED"
    status_of(row(page, refused), "COMPENSATED")
    expect(row(page, refused).locator(".why")).to_contain_text("insufficient balance")
    expect(page.locator("#detail-id")).to_have_text(refused)
    expect(step_card(page, "forward", "charge")).to_have_attribute("data-status", "rejected")
    expect(view_row(page, "orders", saga=refused).locator('td[data-column="status"]')).to_have_text("REJECTED")
    expect(view_row(page, "orders")).to_have_count(2)
    expect(view_row(page, "customers", id=3).locator("td")).to_have_text(["3", "0.00"])
    expect(view_row(page, "customers", id=1).locator("td")).to_have_text(["1", "450.00"])
    live_system.assert_invariants()
    ui.assert_clean()


def test_bad_order_shows_the_apis_message_on_the_field(live_system, ui):
    page = ui.open(live_system.url + "/")
    ui.allow_http_error("/sagas/start", 400)
    bodies = []
    page.on("request", lambda req: bodies.append(req.post_data_json)
            if req.method == "POST" and req.url.endswith("/sagas/start") else None)
    example = {"saga_type": "order", "customer_id": 1, "product_id": 1, "quantity": 1,
               "total_price": "50.00", "status": "pending"}
    # An integer field's text goes as a JSON number when it reads as one, else as typed.
    for label, typed, sent in (("Quantity", "0", 0), ("Customer id", "one", "one")):
        field_name = label.lower().replace(" ", "_")
        body = {**example, field_name: sent}
        expected = live_system.post("/sagas/start", json=body).json()  # the API's own words
        assert expected["field"] == field_name, expected
        start_from_form(page, "order", {"Quantity": "1", "Customer id": "1", label: typed})
        assert bodies[-1] == body, bodies
        expect(page.locator("#order-error")).to_have_text(f"{expected['error']} [field: {field_name}]")
        field = start_form(page, "order").get_by_label(label, exact=True)
        expect(field).to_have_attribute("aria-invalid", "true")
        expect(field).to_have_attribute("aria-describedby", "order-error")
        expect(field).to_be_focused()
    expect(page.get_by_label("Quantity", exact=True)).not_to_have_attribute("aria-invalid", "true")
    assert live_system.query("SELECT COUNT(*) FROM SAGA")[0][0] == 0
    ui.assert_clean()


def test_refused_credit_timeline_shows_the_refund_and_the_credit_as_pivot(live_system, ui):
    live_system.set_fault("B", mode="reject", next=1)
    resp = live_system.transfer({"amount": 100})
    assert resp.status_code == 409, resp.text
    sid = resp.json()["saga"]

    page = ui.open(live_system.url + "/")
    row(page, sid).click()
    status_of(page.locator("#detail-badge"), "COMPENSATED")
    expect(fact(page, "Failed at")).to_have_text("credit (refused)")
    expect(page.locator("#fwd-flow")).to_have_text("debit → credit")
    debit, credit = step_card(page, "forward", "debit"), step_card(page, "forward", "credit")
    expect(debit).to_have_attribute("data-status", "success")
    expect(debit).to_have_attribute("data-service", "A")
    expect(credit).to_have_attribute("data-status", "rejected")
    expect(credit).to_have_attribute("data-service", "B")
    expect(credit).to_have_attribute("data-kind", "retriable")
    expect(credit.locator(".card-kind")).to_have_text("pivot never undone: retried until it lands")
    expect(debit.locator(".card-kind")).to_have_count(0)
    # The refusal proves the credit wrote nothing: the refund of the debit is the only undo.
    comp = page.locator("#lane-comp > li")
    expect(comp).to_have_count(1)
    refund = step_card(page, "comp", "debit")
    expect(refund).to_have_attribute("data-status", "success")
    expect(refund).to_contain_text("refunded 100.00 to A")
    expect(skipped(page, "credit")).to_have_text("credit at B skipped — refused: wrote nothing")
    expect(page.locator("#compensate")).to_be_hidden()
    expect_balances(page, OPENING)
    ui.assert_clean()


def test_choreographed_saga_is_shown_as_an_event_flow(live_system, ui):
    # A real choreography over RabbitMQ: C keeps failing, its events undo B, then A.
    live_system.set_fault("C", mode="fail")
    resp = live_system.register({"username": "chor_user", "address": "5 Event St",
                                 "payment": "Visa"})
    assert resp.status_code == 502, resp.text
    sid = resp.json()["saga"]

    page = ui.open(live_system.url + "/")
    saga_row = row(page, sid)
    status_of(saga_row, "COMPENSATED")
    expect(saga_row.locator("td.type .tag")).to_have_text(["registration", "choreography · rabbitmq"])
    expect(saga_row.locator("td.label")).to_have_text("chor_user")
    saga_row.click()
    expect(page.locator("#detail-id")).to_have_text(sid)
    expect(fact(page, "Mode")).to_have_text("choreography over rabbitmq")
    expect(page.locator("#lanes")).to_be_hidden()
    hops = page.locator("#flow > li")
    expect(hops.locator(".what")).to_have_text([
        "Saga started", "A runs user", "A publishes user.done", "B handles it (address)",
        "B publishes address.done", "C handles it (payment)", "Saga compensating",
        "C publishes payment.failed", "B handles it (undo address)", "B publishes address.undone",
        "A handles it (undo user)", "Saga compensated"])
    payment = hops.nth(5)  # three deliveries of address.done to C: one hop, its attempts
    expect(payment).to_have_attribute("data-status", "failed")
    expect(payment).to_contain_text("attempt 3")
    expect(payment.locator(".attempts li")).to_have_count(2)
    expect(hops.nth(2)).to_have_attribute("data-status", "published")
    expect(hops.nth(2)).to_contain_text("event registration.user.done")
    # The orchestrator only reads a choreographed saga: no operator action is offered.
    expect(page.locator("#compensate")).to_be_hidden()
    expect(page.locator("#retry")).to_be_hidden()
    expect(page.locator("#action-note")).to_contain_text("Choreographed by its services over rabbitmq")
    expect(page.locator(f'#log-rows tr[data-saga="{sid}"]')).to_have_count(
        len(live_system.log(sid)))
    ui.shot("choreography-flow")
    ui.assert_clean()


def test_a_failed_choreographed_saga_is_retried_from_the_page(live_system, ui):
    live_system.set_fault("C", mode="reject", next=1)
    live_system.set_fault("B", mode="fail", on="compensate")
    resp = live_system.register({"username": "chor_stuck", "address": "6 St", "payment": "Visa"})
    assert resp.status_code == 502 and resp.json()["status"] == "FAILED", resp.text
    sid = resp.json()["saga"]

    page = ui.open(live_system.url + "/")
    row(page, sid).click()
    status_of(page.locator("#detail-badge"), "FAILED")
    expect(page.locator("#compensate")).to_be_hidden()
    expect(page.locator("#action-note")).to_contain_text("can send its undo again")
    live_system.set_fault("B", mode="off")
    page.get_by_role("button", name="Retry compensation").click()
    expect(page.locator("#action-msg")).to_contain_text("Now COMPENSATED")
    status_of(row(page, sid), "COMPENSATED")
    assert live_system.row_counts(sid) == {"TABLE_A": 0, "TABLE_B": 0, "TABLE_C": 0}
    ui.assert_clean()


# --- the sequence diagram ---------------------------------------------------------------

def arrows(page):
    return page.locator("#seq .msg")


def log_rows(system, saga_id):
    """The saga's SAGA_LOG rows, every column, in order."""
    conn = system.connect()
    try:
        cur = conn.cursor(dictionary=True)
        cur.execute("SELECT * FROM SAGA_LOG WHERE saga_id = %s ORDER BY id", (saga_id,))
        return cur.fetchall()
    finally:
        conn.close()


def as_shown(row):
    """A SAGA_LOG row as its arrow's tooltip lists it: each column that holds something,
    in the table's order, times in UTC to the millisecond as the API gives them."""
    shown = []
    for column, value in row.items():
        if value is None or value == "":
            continue
        if isinstance(value, datetime):
            value = value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"
        shown.append([column, str(value)])
    return shown


def expected_arrows(rows, choreographed=False, broker=None):
    """(kind, from, to, via, log id) for each arrow the diagram must draw, in order."""
    out = []
    for r in rows:
        if r["service"] == "SAGA":
            out.append(("note", None, None, None, r["id"]))
        elif choreographed and r["action"] == "publish":
            out.append(("event", r["service"], broker, None, r["id"]))
        elif choreographed and r["event"]:
            out.append(("deliver", broker, r["service"], None, r["id"]))
        elif choreographed:
            out.append(("local", r["service"], r["service"], None, r["id"]))
        else:
            out.append(("call", "orchestrator", r["service"], broker, r["id"]))
            out.append(("answer", r["service"], "orchestrator", broker, r["id"]))
    return out


def drawn_arrows(page):
    return [tuple(a) for a in arrows(page).evaluate_all(
        "gs => gs.map(g => [g.dataset.kind, g.dataset.from || null, g.dataset.to || null, "
        "g.dataset.via || null, Number(g.dataset.logId)])")]


def lane_names(page):
    """Each lane's participant, as its heading's tooltip names it (a narrow heading may
    show a short name)."""
    return page.locator("#seq .lane > title").evaluate_all(
        "ts => ts.map(t => t.textContent.split(':')[0])")


def tooltip_of(page, arrow):
    """Hover an arrow; the rows its tooltip lists, as [column, value] pairs."""
    arrow.hover()
    tip = page.locator("#seq-tip")
    expect(tip).to_be_visible()
    expect(tip.locator("h4")).to_have_text(f"SAGA_LOG row {arrow.get_attribute('data-log-id')}")
    return tip.locator("dl").evaluate(
        "dl => Array.from(dl.querySelectorAll('dt')).map(dt => [dt.textContent, dt.nextElementSibling.textContent])")


def show_saga(page, saga_id, status):
    saga_row = row(page, saga_id)
    status_of(saga_row, status)
    saga_row.click()
    expect(page.locator("#detail-id")).to_have_text(saga_id)
    status_of(page.locator("#detail-badge"), status)


def test_sequence_diagram_shows_calls_retries_and_compensations_in_order(live_system, ui):
    # A fails once (then its retry commits), B commits, C refuses: B then A are undone.
    live_system.set_fault("A", mode="fail", next=1)
    live_system.set_fault("C", mode="reject")
    resp = live_system.start({"username": "drawn", "address": "8 Arrow Ln", "payment": "Visa"})
    assert resp.status_code == 409, resp.text
    sid = resp.json()["saga"]
    rows = log_rows(live_system, sid)

    page = ui.open(live_system.url + "/")
    show_saga(page, sid, "COMPENSATED")
    seq = page.locator("#seq")
    expect(seq).to_have_attribute("data-lanes", "orchestrator A B C")
    assert lane_names(page) == ["Orchestrator", "A", "B", "C"]
    expect(seq).to_have_attribute("aria-label", re.compile(
        r"^Sequence diagram, one lane each for Orchestrator, A, B and C; 12 arrows"))
    expect(page.locator("#seq-box")).to_have_accessible_name("Sequence")
    # Every call and its answer, and the saga's own state changes, in SAGA_LOG order.
    expected = expected_arrows(rows)
    expect(arrows(page)).to_have_count(len(expected))
    assert drawn_arrows(page) == expected
    notes = seq.locator(".msg.k-note")
    assert notes.evaluate_all("gs => gs.map(g => g.dataset.status)") == ["STARTED", "COMPENSATING", "COMPENSATED"]
    # A's first attempt failed with a 500, its second one committed.
    first = seq.locator('.msg[data-kind="answer"][data-service="A"][data-attempt="1"][data-action="invoke"]')
    expect(first).to_have_attribute("data-status", "failed")
    expect(first.locator(".lbl")).to_have_text(re.compile(r"^failed 500 · \d+ ms$"))
    retry = seq.locator('.msg[data-kind="call"][data-service="A"][data-attempt="2"][data-action="invoke"]')
    expect(retry).to_have_attribute("aria-label", re.compile(
        r"^Orchestrator to service A \(call\): user, attempt 2 — SAGA_LOG row \d+"))
    refused = seq.locator('.msg[data-kind="answer"][data-service="C"]')
    expect(refused).to_have_attribute("data-status", "rejected")
    expect(refused.locator(".lbl")).to_have_text(re.compile(r"^rejected 422 · \d+ ms$"))
    # The compensations: B, then A, in reverse order of the steps.
    undo = seq.locator('.msg[data-kind="call"][data-action="compensate"]')
    assert undo.evaluate_all("gs => gs.map(g => g.dataset.service)") == ["B", "A"]
    expect(undo.first).to_have_class(re.compile(r"\bundo\b"))
    expect(undo.first.locator(".lbl")).to_have_text("undo address")
    # Hovering an arrow shows its SAGA_LOG row, as the table holds it.
    by_id = {r["id"]: r for r in rows}
    for arrow in (retry, refused, undo.last):
        assert tooltip_of(page, arrow) == as_shown(by_id[int(arrow.get_attribute("data-log-id"))])
    page.mouse.move(0, 0)
    expect(page.locator("#seq-tip")).to_be_hidden()
    # The keyboard walks the arrows, each showing its row.
    arrows(page).first.focus()
    page.keyboard.press("ArrowDown")
    expect(arrows(page).nth(1)).to_be_focused()
    expect(page.locator("#seq-tip h4")).to_have_text(f"SAGA_LOG row {expected[1][4]}")
    ui.shot("sequence-http")
    # The picture alone, for the README (with SAGA_UPDATE_SCREENSHOT=1).
    page.keyboard.press("Escape")
    expect(page.locator("#seq-tip")).to_be_hidden()
    arrows(page).nth(1).blur()
    os.makedirs(ARTIFACTS, exist_ok=True)
    path = os.path.join(ARTIFACTS, "sequence.png")
    page.locator("#seq-box").screenshot(path=path)
    if os.environ.get("SAGA_UPDATE_SCREENSHOT"):
        os.makedirs(os.path.dirname(DOC_SEQUENCE), exist_ok=True)
        shutil.copyfile(path, DOC_SEQUENCE)
    ui.assert_clean()


def test_sequence_diagram_over_kafka_runs_through_a_broker_lane(kafka_system, ui):
    kafka_system.set_fault("B", mode="fail", next=1)
    resp = kafka_system.start({"username": "via_kafka", "address": "9 Topic St", "payment": "Visa"})
    assert resp.status_code == 200, resp.text
    sid = resp.json()["saga"]
    rows = log_rows(kafka_system, sid)

    page = ui.open(kafka_system.url + "/")
    show_saga(page, sid, "COMPLETED")
    seq = page.locator("#seq")
    expect(seq).to_have_attribute("data-lanes", "orchestrator kafka A B C")
    assert lane_names(page) == ["Orchestrator", "Kafka", "A", "B", "C"]
    expected = expected_arrows(rows, broker="kafka")
    expect(arrows(page)).to_have_count(len(expected))
    assert drawn_arrows(page) == expected  # every command and reply goes through Kafka
    retried = seq.locator('.msg[data-kind="answer"][data-service="B"]')
    expect(retried).to_have_count(2)
    expect(retried.first).to_have_attribute("data-status", "failed")
    expect(retried.last).to_have_attribute("data-attempt", "2")
    # A reply over Kafka has no HTTP code to show.
    expect(retried.last.locator(".lbl")).to_have_text(re.compile(r"^success · \d+ ms$"))
    expect(retried.last).to_have_attribute("aria-label", re.compile(
        r"^service B to Orchestrator through Kafka \(answer\): success"))
    assert tooltip_of(page, retried.last) == as_shown(rows[[r["id"] for r in rows].index(
        int(retried.last.get_attribute("data-log-id")))])
    ui.shot("sequence-kafka")
    ui.assert_clean()


def test_sequence_diagram_of_a_choreography_shows_its_events_through_rabbitmq(live_system, ui):
    live_system.set_fault("C", mode="fail")
    resp = live_system.register({"username": "chor_drawn", "address": "5 Event St", "payment": "Visa"})
    assert resp.status_code == 502, resp.text
    sid = resp.json()["saga"]
    rows = log_rows(live_system, sid)

    page = ui.open(live_system.url + "/")
    show_saga(page, sid, "COMPENSATED")
    seq = page.locator("#seq")
    # No orchestrator in the path: the services and the broker between them.
    expect(seq).to_have_attribute("data-lanes", "rabbitmq A B C")
    assert lane_names(page) == ["RabbitMQ", "A", "B", "C"]
    expected = expected_arrows(rows, choreographed=True, broker="rabbitmq")
    expect(arrows(page)).to_have_count(len(expected))
    assert drawn_arrows(page) == expected
    events = seq.locator('.msg[data-kind="event"] .lbl')
    expect(events).to_have_text(["user.done", "address.done", "payment.failed", "address.undone"])
    # Three deliveries of address.done to C, each failing, then the undo by events: B, A.
    to_c = seq.locator('.msg[data-kind="deliver"][data-to="C"]')
    assert to_c.evaluate_all("gs => gs.map(g => [g.dataset.attempt, g.dataset.status])") == [
        ["1", "failed"], ["2", "failed"], ["3", "failed"]]
    expect(to_c.last).to_have_attribute("aria-label", re.compile(
        r"^RabbitMQ to service C \(delivery\): address\.done → payment, attempt 3: failed"))
    undo = seq.locator('.msg[data-action="compensate"]')
    assert undo.evaluate_all("gs => gs.map(g => g.dataset.to)") == ["B", "A"]
    expect(undo.first).to_have_attribute("aria-label", re.compile(
        r"^RabbitMQ to service B \(delivery\): payment\.failed → undo address: success — SAGA_LOG row"))
    expect(undo.first).to_have_class(re.compile(r"\bundo\b"))
    assert tooltip_of(page, to_c.nth(1)) == as_shown(rows[[r["id"] for r in rows].index(
        int(to_c.nth(1).get_attribute("data-log-id")))])
    ui.shot("sequence-choreography")
    ui.assert_clean()


def test_services_and_fault_modes_are_described_by_the_orchestrator(live_system, ui):
    described = live_system.get("/saga-types").json()["services"]
    modes = live_system.get("/fault-modes").json()["modes"]
    page = ui.open(live_system.url + "/")
    expect(page.locator("#svc-list")).to_have_text("services " + " · ".join(described))
    for service, ops in described.items():
        by_type = {}
        for entry in ops:
            by_type.setdefault(entry["type"], []).append(entry["op"])
        expect(page.locator(f"#svc-{service}-ops")).to_have_text(
            ", ".join(f"{t}.{'/'.join(dict.fromkeys(names))}" for t, names in by_type.items()))
    names = [m["name"] for m in modes]
    expect(fault_form(page, "A").get_by_label("Mode").locator("option")).to_have_text(names)
    expect(page.locator("#mode-help dt")).to_have_text(names)
    expect(page.locator("#mode-help dd")).to_have_text(
        [re.compile("^" + re.escape(m["description"])) for m in modes])
    ui.assert_clean()


def test_log_tail_shows_a_row_that_committed_late_in_id_order(live_system, ui):
    page = ui.open(live_system.url + "/")
    # A transaction that took its SAGA_LOG id before the saga's rows and commits after them.
    held = live_system.connect()
    try:
        cur = held.cursor()
        cur.execute("INSERT INTO SAGA_LOG (saga_id, service, status, message) "
                    "VALUES ('held-open', 'SAGA', 'NOTE', 'committed after the saga')")
        late_id = cur.lastrowid
        sid = live_system.start().json()["saga"]
        saga_ids = [i for i, in live_system.query("SELECT id FROM SAGA_LOG WHERE saga_id = %s", (sid,))]
        assert late_id < min(saga_ids)
        expect(page.locator(f'#log-rows tr[data-saga="{sid}"]')).to_have_count(len(saga_ids))
        held.commit()
    finally:
        held.close()
    late = page.locator(f'#log-rows tr[data-log-id="{late_id}"]')
    expect(late).to_have_count(1)
    expect(late).to_contain_text("committed after the saga")
    ids = page.locator("#log-rows > tr").evaluate_all("trs => trs.map(tr => Number(tr.dataset.logId))")
    assert ids == sorted(set(ids)), ids  # each row once, in id order
    assert ids.index(late_id) == ids.index(min(saga_ids)) - 1
    ui.assert_clean()


def test_balances_say_which_service_cannot_be_read_and_recover(live_system, ui):
    page = ui.open(live_system.url + "/")
    expect_balances(page, OPENING)
    ui.allow_http_error("/accounts", 503)
    live_system.system.kill("service_c")
    expect(balance(page, "C")).to_have_text("unreadable")
    expect(page.locator('#balances li[data-account="C"]')).to_have_class(re.compile(r"\bunreadable\b"))
    expect(page.locator("#bal-total")).to_have_text("unknown")
    expect(page.locator("#money-msg")).to_contain_text("Cannot read C: service C unreachable")
    expect(balance(page, "A")).to_have_text("1000.00")
    expect(page.locator("#conn")).to_have_text("live")  # the orchestrator itself answers
    live_system.system.start("service_c")
    expect_balances(page, OPENING)
    expect(page.locator("#money-msg")).to_be_hidden()
    ui.assert_clean()


def test_screenshot_of_a_busy_monitor(live_system, ui):
    """Not a promise but a picture: registrations and transfers, completed and undone, the
    seed's failure pattern, the balances, and a refused transfer's timeline selected.
    Saved to test-artifacts/; with SAGA_UPDATE_SCREENSHOT=1 also to docs/screenshot.png
    for the README."""
    page = ui.open(live_system.url + "/")
    ui.allow_http_error("/accounts", 503)  # a balance read may meet B restarting after a crash
    ui.allow_http_error("/views/customers", 502)  # and so may the customers' view, read at B
    live_system.post("/sagas/start", json={"saga_type": "order", "customer_id": 1, "product_id": 7,
                                           "quantity": 2, "total_price": "80.00"})
    live_system.post("/sagas/start", json={"saga_type": "order", "customer_id": 2, "product_id": 3,
                                           "quantity": 1, "total_price": "150.00"})  # more than 2 holds
    live_system.set_fault("A", mode="fail", every=2)
    live_system.set_fault("B", mode="crash", every=2)
    people = [("john_doe", "123 Main St", "Visa"), ("ada", "12 Analytical Way", "Mastercard"),
              ("grace", "1 Compiler Ct", "Amex"), ("linus", "4 Kernel Rd", "Visa")]
    for username, address, payment in people[:2]:
        live_system.start({"username": username, "address": address, "payment": payment})
    live_system.transfer({"amount": 100})
    for username, address, payment in people[2:]:
        live_system.start({"username": username, "address": address, "payment": payment})
    live_system.set_fault("C", mode="reject", next=1)
    live_system.start({"username": "mallory", "address": "7 Nowhere St", "payment": "expired card"})
    live_system.transfer({"from": "B", "to": "C", "amount": "42.50"})
    live_system.transfer({"from": "C", "to": "A", "amount": "500"})  # more than C holds
    live_system.start({"username": "zoë", "address": "Straße 1", "payment": "Visa"})
    live_system.set_fault("B", mode="reject", next=1)
    refused = live_system.transfer({"from": "A", "to": "B", "amount": "75"}).json()["saga"]
    live_system.set_fault("B", mode="crash", every=2)
    live_system.set_fault("C", mode="off")
    expect(page.locator("#fault-C-h").locator("xpath=../..")).to_contain_text("Fault: off")
    expect(page.locator("#saga-rows > tr")).to_have_count(12)
    expect(page.locator("#saga-rows > tr.flash")).to_have_count(0)
    expect(page.locator('#saga-rows > tr[data-status="RUNNING"], #saga-rows > tr[data-status="COMPENSATING"]')
           ).to_have_count(0)
    balances = live_system.balances()
    expect_balances(page, {k: f"{v:.2f}" for k, v in balances.items()})
    expect(page.locator("#money .changed")).to_have_count(0)  # their flash has faded
    expect(view_row(page, "orders")).to_have_count(2)
    row(page, refused).click()
    expect(page.locator("#lane-comp > li")).to_have_count(1)
    expect(step_card(page, "comp", "debit")).to_have_attribute("data-status", "success")
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
