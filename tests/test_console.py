"""``oms console``: the web console as a real process in front of a real
service (in-process, real sockets and LMDB, the real simulators).

HTTP-level tests check the rules (login, CSRF, read-only, clear error pages);
browser tests drive Debian's ``chromium`` through ``chromium-driver`` with
Selenium, headless (installed here with apt if missing and we are root, else
skipped with the reason). The browser tests also take the screenshots in
``docs/console.md`` (set ``OMS_CONSOLE_SCREENSHOTS=DIR`` to write them).
"""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import Endpoints, Proc, SimThread, free_port
from helpers import debian_tools, poll_until, retail_order
from test_operations import control, hold_policy
from test_security import keys, opts, secure  # noqa: F401 - fixtures

from app.service import Service
from gateways.client import Client, wait_terminal
from gateways.sim_domain import SimConfig
from oms.config import Config

pytest.importorskip("flask", reason="the console's web stack (oms[console]) is not installed")
pytest.importorskip("waitress", reason="the console's web stack (oms[console]) is not installed")

from console.auth import set_user
from console.backend import EventFeed

ROOT = Path(__file__).resolve().parent.parent
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--window-size=1280,1000"]


# -- the stack: service + simulators + console ----------------------------------


@dataclass
class Stack:
    eps: Endpoints
    sim: SimThread
    service: Service
    users: Path
    url: str
    client: Client

    def fallout(self, ext: str, code: str = "payment_declined") -> str:
        """A real fallout: capture_payment fails for good, the order is held."""
        control(self.eps.systems["billing"], capture_payment=[1.0, code])
        try:
            oid = self.client.submit(retail_order(ext, customer={"id": f"cust-{ext}"}))[
                "order_id"]
            poll_until(lambda: self.client.get(oid)["order"].get("state_reason") == "fallout",
                       timeout=15)
        finally:
            control(self.eps.systems["billing"], capture_payment=[0])
        return oid


def start_console(tmp: Path, eps: Endpoints, *extra: str, intake: str | None = None) -> tuple[
        Proc, str]:
    port = free_port()
    proc = Proc(["console", "--port", str(port), "--intake", intake or eps.intake,
                 "--events", eps.events, "--timeout", "1.5", *extra],
                tmp / f"console-{port}.log")
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.exited() is not None:
            raise AssertionError(f"the console exited: {proc.tail()}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    poll_until(up, timeout=20, every=0.05)
    return proc, url


@pytest.fixture(scope="module")
def stack(tmp_path_factory: Any) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("console")
    eps = Endpoints()
    sim = SimThread(SimConfig(systems=dict(eps.systems), service_events=eps.domain_events,
                              delivery_s=0.05, restock_s=0.1, seed=1, event_resend_s=0.2))
    procs = hold_policy(tmp / "procs")  # fallout is held for an operator, and an order
    retail = Path(procs) / "retail.toml"  # held over 2 s is in jeopardy
    retail.write_text(retail.read_text().replace("\n[defaults]", "expected_s = 2.0\n\n[defaults]"))
    svc = Service(Config(data=str(tmp / "data"), intake=eps.intake, events=eps.events,
                         domain_events=eps.domain_events, metrics_port=0,
                         systems=dict(eps.systems), processes=procs))
    svc.start()
    users = tmp / "users"
    set_user(users, "ann", "operator", "ann-password")
    set_user(users, "vic", "viewer", "vic-password")
    console, url = start_console(tmp, eps, "--users", str(users))
    client = Client(eps.intake, timeout=10)
    try:
        yield Stack(eps, sim, svc, users, url, client)
    finally:
        client.close()
        assert console.stop(10) == 0, console.tail()
        svc.stop()
        sim.stop()


# -- a small HTTP client with cookies --------------------------------------------


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any) -> None:
        return None


class Web:
    def __init__(self, base: str) -> None:
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar),
                                                  NoRedirect())

    def call(self, path: str, form: dict[str, str] | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, str, Any]:
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        req = urllib.request.Request(self.base + path, data=data, headers=headers or {})
        try:
            with self.opener.open(req, timeout=10) as resp:
                return resp.status, resp.read().decode(), resp.headers
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(), exc.headers

    def csrf(self, path: str = "/") -> str:
        status, body, _ = self.call(path)
        assert status == 200, body
        match = re.search(r'name="csrf" (?:value|content)="([^"]+)"', body)
        assert match, body
        return match.group(1)

    def login(self, name: str, password: str) -> int:
        token = self.csrf("/login")
        return self.call("/login", {"csrf": token, "name": name, "password": password})[0]


def text_of(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


# -- HTTP-level rules --------------------------------------------------------------


def test_actions_need_an_operator_login(stack: Stack) -> None:
    oid = stack.fallout("http-login")
    web = Web(stack.url)
    token = web.csrf(f"/orders/{oid}")
    status, body, _ = web.call(f"/orders/{oid}/retry", {"csrf": token, "reason": "try"})
    assert status == 403 and "Log in as an operator" in body
    assert web.login("ann", "wrong password") == 401
    assert web.login("nobody", "ann-password") == 401
    viewer = Web(stack.url)
    assert viewer.login("vic", "vic-password") == 302
    token = viewer.csrf(f"/orders/{oid}")
    status, body, _ = viewer.call(f"/orders/{oid}/retry", {"csrf": token, "reason": "try"})
    assert status == 403 and "may look at orders but not act" in body
    assert stack.client.get(oid)["order"]["state_reason"] == "fallout"  # nothing happened
    assert web.login("ann", "ann-password") == 302
    token = web.csrf(f"/orders/{oid}")
    status, body, _ = web.call(f"/orders/{oid}/retry", {"csrf": token, "reason": ""})
    assert status == 400 and "A reason is required" in body
    status, body, _ = web.call(f"/orders/{oid}/retry", {"csrf": token, "reason": "x" * 501})
    assert status == 400 and "too long" in body
    status, _, headers = web.call(f"/orders/{oid}/abort", {"csrf": token, "reason": "bad card"})
    assert status == 302 and headers["Location"].endswith(f"/orders/{oid}")
    view = wait_terminal(stack.client, [oid], timeout=20)[oid]
    assert view["state"] == "failed"
    entry = next(h for h in view["history"] if h.get("action"))
    assert (entry["action"], entry["operator"], entry["reason"]) == ("abort", "ann", "bad card")


def test_every_action_is_refused_without_the_sessions_csrf_token(stack: Stack) -> None:
    oid = stack.fallout("http-csrf")
    web = Web(stack.url)
    assert web.login("ann", "ann-password") == 302
    token = web.csrf(f"/orders/{oid}")
    for action in ("retry", "skip", "abort", "cancel"):
        for form in ({"reason": "x"}, {"reason": "x", "csrf": "forged"},
                     {"reason": "x", "csrf": ""}):
            status, body, _ = web.call(f"/orders/{oid}/{action}", form)
            assert status == 403 and "security token" in body, (action, form)
    # the right token from another site's page: refused by its Origin
    status, body, _ = web.call(f"/orders/{oid}/retry", {"csrf": token, "reason": "x"},
                               {"Origin": "http://evil.example"})
    assert status == 403 and "another site" in body
    # another browser's token is not this session's
    other = Web(stack.url)
    assert other.login("ann", "ann-password") == 302
    status, _, _ = web.call(f"/orders/{oid}/retry", {"csrf": other.csrf(), "reason": "x"})
    assert status == 403
    # logging in needs the token too (no login CSRF), and logging out
    assert Web(stack.url).call("/login", {"name": "ann", "password": "ann-password"})[0] == 403
    assert web.call("/logout", {})[0] == 403
    assert stack.client.get(oid)["order"]["state_reason"] == "fallout"  # still untouched
    _, _, headers = Web(stack.url).call("/")  # a new visitor gets its session cookie
    cookie = headers.get("Set-Cookie") or ""
    assert "SameSite=Strict" in cookie and "HttpOnly" in cookie
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]


def test_unknown_order_bad_input_and_unknown_pages_get_a_clear_page(stack: Stack) -> None:
    web = Web(stack.url)
    status, body, _ = web.call("/orders/O999999999999")
    assert status == 404 and "There is no order O999999999999" in text_of(body)
    for path, code in (("/orders/%3Cscript%3E", 400), ("/orders/" + "9" * 300, 400),
                       ("/search?state=nonsense", 400), ("/search?customer_id=" + "x" * 500, 400),
                       ("/nowhere", 404), ("/orders/O1/explode", 405)):
        status, body, _ = web.call(path)
        assert status == code, (path, status)
        assert "Traceback" not in body and "<h1>" in body, path
    token = web.csrf()
    status, body, _ = web.call("/orders/O1/explode", {"csrf": token, "reason": "x"})
    assert status == 404 and "no action" in body
    status, body, _ = web.call("/search?external_id=%3Cb%3Ebold%3C%2Fb%3E&go=1")
    assert status == 200 and "<b>bold</b>" not in body and "&lt;b&gt;bold" in body


def test_a_search_by_a_malformed_order_id_is_a_clear_page_not_a_redirect(
        stack: Stack) -> None:
    """docs/console.md: a malformed order id gets a page that says so (400).
    The search by order id redirected to ``/orders/<what was typed>``
    unchecked: ``../../healthz`` sent the browser to ``/healthz`` (any path
    of the console: a crafted link); ``/orders/<id>`` itself answers 400."""
    web = Web(stack.url)
    for typed in ("../../healthz", "..%2F..%2Fevents", "a/b", "%3Cscript%3E", "9" * 150):
        status, body, headers = web.call(f"/search?order_id={typed}")
        assert status == 400, (typed, status, headers.get("Location"))
        assert "not an order id" in text_of(body), typed


def test_search_by_external_and_customer_id_newest_first(stack: Stack) -> None:
    ids = [stack.client.submit(retail_order(f"srch-{i}", customer={"id": "cust-srch"}))[
        "order_id"] for i in range(3)]
    wait_terminal(stack.client, ids, timeout=20)
    web = Web(stack.url)
    status, body, _ = web.call("/search?external_id=srch-1&go=1")
    assert status == 200 and ids[1] in body and ids[0] not in body and ids[2] not in body
    status, body, _ = web.call("/search?customer_id=cust-srch&go=1")
    listed = re.findall(r'<td><a href="/orders/(O\d+)">', body)
    assert listed == ids[::-1], listed  # newest first
    status, _, headers = web.call("/search?source_system=web&external_id=srch-2")
    assert status == 302 and headers["Location"].endswith(f"/orders/{ids[2]}")
    status, _, headers = web.call(f"/search?order_id={ids[0]}")
    assert status == 302 and headers["Location"].endswith(f"/orders/{ids[0]}")


def test_search_pages_follow_the_services_cursor(stack: Stack) -> None:
    """Pages of 2 over 5 orders of one customer among others: every order once,
    newest first (the console filters the rows again, for a service that does
    not know a filter)."""
    from console.backend import Backend

    ids, others = [], []
    for i in range(5):
        ids.append(stack.client.submit(retail_order(f"page-{i}", customer={"id": "cust-page"}))[
            "order_id"])
        others.append(stack.client.submit(retail_order(f"other-{i}"))["order_id"])
    wait_terminal(stack.client, ids + others, timeout=20)  # not caught by a later fallout
    backend = Backend(stack.eps.intake)
    try:
        seen, cursor, pages = [], None, 0
        while True:
            rows, cursor = backend.search({"customer_id": "cust-page"}, cursor, size=2)
            seen += [r["order_id"] for r in rows]
            pages += 1
            assert len(rows) <= 2 and pages <= 4
            if cursor is None:
                break
        assert seen == ids[::-1], seen  # newest first, each once
        assert backend.search({"customer_id": "nobody"}, size=2) == ([], None)
    finally:
        backend.close()


def test_read_only_console_has_no_actions_and_no_logins(stack: Stack, tmp_path: Path) -> None:
    oid = stack.fallout("http-ro")
    proc, url = start_console(tmp_path, stack.eps, "--users", str(stack.users), "--read-only")
    try:
        web = Web(url)
        status, body, _ = web.call(f"/orders/{oid}")
        assert status == 200 and "read-only" in body and 'id="do-retry"' not in body
        assert "payment_declined" in body  # it still shows why
        assert web.call("/login")[0] == 403
        token = web.csrf(f"/orders/{oid}")
        status, body, _ = web.call(f"/orders/{oid}/retry", {"csrf": token, "reason": "x"})
        assert status == 403 and "read-only" in body
    finally:
        assert proc.stop(10) == 0
    assert stack.client.get(oid)["order"]["state_reason"] == "fallout"


def test_private_console_needs_a_login_to_look(stack: Stack, tmp_path: Path) -> None:
    proc, url = start_console(tmp_path, stack.eps, "--users", str(stack.users), "--private")
    try:
        web = Web(url)
        status, _, headers = web.call("/search?external_id=x")
        assert status == 302 and "/login" in headers["Location"]
        assert web.login("vic", "vic-password") == 302
        assert web.call("/search?external_id=x")[0] == 200
        # after a login the console goes back only to its own pages
        for target, lands in (("/search?go=1", "/search?go=1"), ("//evil.example/", "/"),
                              ("http://evil.example/", "/")):
            token = web.csrf("/login")
            status, _, headers = web.call(
                "/login?" + urllib.parse.urlencode({"next": target}),
                {"csrf": token, "name": "vic", "password": "vic-password"})
            assert status == 302 and headers["Location"].endswith(lands)
            assert "evil" not in headers["Location"]
    finally:
        assert proc.stop(10) == 0


def test_service_down_gets_a_clear_page(stack: Stack, tmp_path: Path) -> None:
    nobody = f"tcp://127.0.0.1:{free_port()}"
    proc, url = start_console(tmp_path, stack.eps, "--users", str(stack.users), intake=nobody)
    try:
        web = Web(url)
        for path in ("/", "/orders/O000000000001", "/search?external_id=x"):
            status, body, _ = web.call(path)
            assert status == 503, path
            assert "The service does not answer" in body and "Traceback" not in body
        assert web.login("ann", "ann-password") == 302  # logins do not need the service
        status, body, _ = web.call("/orders/O000000000001/retry",
                                   {"csrf": web.csrf("/login"), "reason": "x"})
        assert status == 503 and "may or may not have been carried out" in body
        assert proc.exited() is None  # and the console keeps serving
    finally:
        assert proc.stop(10) == 0


def test_console_refuses_a_credentials_file_others_can_read(stack: Stack,
                                                             tmp_path: Path) -> None:
    loose = tmp_path / "users"
    shutil.copy(stack.users, loose)
    loose.chmod(0o644)
    proc = Proc(["console", "--port", str(free_port()), "--users", str(loose)],
                tmp_path / "loose.log")
    assert proc.p.wait(20) == 2
    assert "chmod 600" in proc.tail()


def test_passwd_command_writes_a_salted_hash(tmp_path: Path) -> None:
    from console.auth import authenticate, load_users

    file = tmp_path / "users"
    for password in ("first-password", "second-password"):
        done = subprocess.run([str(ROOT / ".venv/bin/python"), "-m", "app.cli", "console",
                               "passwd", str(file), "bea", "--password-stdin"],
                              input=password + "\n", capture_output=True, text=True,
                              timeout=30, check=False)
        assert done.returncode == 0, done.stderr
    users = load_users(file)
    assert list(users) == ["bea"] and oct(file.stat().st_mode & 0o777) == "0o600"
    assert "second-password" not in file.read_text()
    assert authenticate(users, "bea", "second-password") is not None
    assert authenticate(users, "bea", "first-password") is None
    assert authenticate(users, "nobody", "second-password") is None
    from app.cli import build_parser

    args = build_parser().parse_args(["console"])
    assert (args.host, args.port) == ("127.0.0.1", 8470)  # this machine only, by default


def test_cancel_by_an_operator_is_in_the_history(stack: Stack) -> None:
    oid = stack.fallout("http-cancel")
    bad = stack.client.request({"type": "cancel_order", "order_id": oid, "operator": 7})
    assert bad["type"] == "error" and bad["code"] == "malformed"
    bad = stack.client.request({"type": "cancel_order", "order_id": oid, "operator": "x" * 65})
    assert bad["type"] == "error" and bad["code"] == "malformed"
    web = Web(stack.url)
    assert web.login("ann", "ann-password") == 302
    token = web.csrf(f"/orders/{oid}")
    assert web.call(f"/orders/{oid}/cancel", {"csrf": token, "reason": "customer called"})[
        0] == 302
    view = wait_terminal(stack.client, [oid], timeout=20)[oid]
    assert view["state"] == "cancelled"
    entry = next(h for h in view["history"] if h.get("action"))
    assert (entry["action"], entry["operator"], entry["reason"]) == (
        "cancel", "ann", "customer called")
    _, body, _ = web.call(f"/orders/{oid}")
    assert "operator <strong>ann</strong> asked to cancel: customer called" in body


def test_console_uses_its_own_operator_key_under_curve(
        secure: Any, keys: Path,  # noqa: F811 - pytest passes the fixtures imported above by name
        eps: Endpoints, tmp_path: Path) -> None:
    from actors.security import generate

    generate(keys / "own", ["operator-console"])
    (keys / "clients" / "operator-console.key").write_text(
        (keys / "own" / "operator-console.key").read_text())
    secure.reload_keys()
    with Client(eps.intake, curve=opts(keys, "web")) as web:
        oid = web.submit(retail_order("curve-console"))["order_id"]
    curve = ["--curve-key", str(keys / "own" / "operator-console.key_secret"),
             "--service-key", str(keys / "server" / "server.key")]
    proc, url = start_console(tmp_path, eps, *curve)
    plain, plain_url = start_console(tmp_path, eps)  # no key: the handshake never completes
    try:
        status, body, _ = Web(url).call("/search?external_id=curve-console&go=1")
        assert status == 200 and oid in body  # an operator lists every source's orders
        status, body, _ = Web(url).call("/")
        assert status == 200 and "needs an operator key" not in body
        assert Web(plain_url).call(f"/orders/{oid}")[0] == 503
    finally:
        assert proc.stop(10) == 0 and plain.stop(10) == 0


def test_overview_lists_orders_in_jeopardy_until_they_end(stack: Stack) -> None:
    oid = stack.fallout("http-late")
    web = Web(stack.url)

    def late() -> bool:
        section = web.call("/live/overview")[1].split('id="jeopardy"')[1]
        return oid in section

    poll_until(late, timeout=10, every=0.2)  # held past the process's expected 2 s
    web.login("ann", "ann-password")
    web.call(f"/orders/{oid}/abort", {"csrf": web.csrf(f"/orders/{oid}"), "reason": "late"})
    wait_terminal(stack.client, [oid], timeout=20)
    poll_until(lambda: not late(), timeout=10, every=0.2)


def test_live_stream_names_the_orders_that_change(stack: Stack) -> None:
    with urllib.request.urlopen(stack.url + "/events", timeout=10) as stream:
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        lines: list[str] = []
        while "event: hello" not in lines:
            lines.append(stream.readline().decode().strip())
        oid = stack.client.submit(retail_order("sse-1"))["order_id"]
        while True:  # a burst of events comes as a few "changes" messages
            line = stream.readline().decode().strip()
            if line.startswith("data:") and oid in json.loads(line[5:]).get("order_ids", []):
                break


def test_event_feed_remembers_jeopardy_until_the_order_ends() -> None:
    feed = EventFeed("tcp://127.0.0.1:1", keep=2)
    q = feed.listen(size=2)
    feed.deliver([{"type": "order_jeopardy", "order_id": f"O{i}", "step": "order"}
                  for i in range(3)] + [{"type": "order_state", "order_id": "O2",
                                         "state": "completed"}, "not a map"])  # type: ignore[list-item]
    assert [j["order_id"] for j in feed.in_jeopardy()] == ["O1"]
    assert q.qsize() == 2  # a slow page loses events, never blocks the feed
    feed.unlisten(q)
    assert feed.listeners == 0


# -- in a real browser --------------------------------------------------------------


@pytest.fixture(scope="module")
def chrome() -> dict[str, str]:
    bins = debian_tools(("chromium", "chromedriver"), ("chromium", "chromium-driver"))
    if not all(bins.values()):
        pytest.skip("Debian's chromium and chromium-driver are not installed and cannot be here")
    pytest.importorskip("selenium", reason="selenium (the test extra) is not installed")
    return bins  # type: ignore[return-value]


@pytest.fixture(scope="module")
def browser(chrome: dict[str, str], tmp_path_factory: Any) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as ChromeService

    profile = tmp_path_factory.mktemp("chromium-profile")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome["chromium"]
    for flag in [*CHROME_FLAGS, f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    # the driver's path is given: Selenium Manager is not run (it would download)
    service = ChromeService(executable_path=chrome["chromedriver"],
                            log_output=str(profile.parent / "chromedriver.log"))
    driver = webdriver.Chrome(options=opts, service=service)
    driver.set_page_load_timeout(15)
    try:
        yield driver
    finally:
        driver.quit()


def shot(driver: Any, name: str) -> None:
    folder = os.environ.get("OMS_CONSOLE_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / f"{name}.png"))


def wait_for(driver: Any, check: Any, timeout: float = 10.0) -> Any:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # live fragments replace elements while we look: look again
    return WebDriverWait(driver, timeout, poll_frequency=0.05, ignored_exceptions=(
        NoSuchElementException, StaleElementReferenceException)).until(lambda _d: check())


def by_id(driver: Any, element_id: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def refreshed(driver: Any) -> bool:
    """The live page has connected to /events and fetched its fragment once."""
    return bool(driver.execute_script(
        "var l = document.getElementById('live'); return l && l.getAttribute('data-refreshed');"))


def present(driver: Any, element_id: str) -> bool:
    from selenium.webdriver.common.by import By

    return bool(driver.find_elements(By.ID, element_id))


@pytest.mark.slow
def test_browser_operator_finds_a_failed_order_and_retries_it(stack: Stack, browser: Any) -> None:
    """The issue's 'done when': from an external id to a retried, completed order."""
    from selenium.webdriver.common.by import By

    started = time.monotonic()
    done = [stack.client.submit(retail_order(f"shop-{i}", customer={"id": f"cust-{i}"}))[
        "order_id"] for i in range(4)]
    wait_terminal(stack.client, done, timeout=20)
    browser.get(stack.url + "/")
    assert "Overview" in browser.title
    wait_for(browser, lambda: not by_id(browser, "live-badge").get_attribute("hidden"))
    browser.execute_script("window.notReloaded = true;")
    oid = stack.fallout("WEB-1042")  # appears on the open overview without a reload
    wait_for(browser, lambda: oid in by_id(browser, "fallout").text)
    assert browser.execute_script("return window.notReloaded === true;")
    shot(browser, "overview")

    # the operator knows only the external id
    box = browser.find_element(By.CSS_SELECTOR, "form.quick input[name=external_id]")
    box.send_keys("WEB-1042")
    box.submit()
    wait_for(browser, lambda: present(browser, "results"))
    rows = by_id(browser, "results").find_elements(By.CSS_SELECTOR, "tbody tr")
    assert len(rows) == 1 and "held" in rows[0].text
    shot(browser, "search")
    rows[0].find_element(By.LINK_TEXT, oid).click()

    # the order page: its steps, why it is held, what can be done
    wait_for(browser, lambda: present(browser, "steps") and refreshed(browser))
    # read in one script: the live page may replace the list between two reads
    steps = dict(browser.execute_script(
        "return Array.from(document.querySelectorAll('#steps li.step'))"
        ".map(li => [li.getAttribute('data-step'), li.innerText]);"))
    assert {"reserve_stock", "create_invoice", "capture_payment"} <= set(steps)
    assert "failed" in steps["capture_payment"] and "done" in steps["reserve_stock"]
    wait_for(browser, lambda: "payment_declined" in by_id(browser, "failure").text)
    assert not present(browser, "do-retry")  # not logged in: no action forms
    by_id(browser, "actions").find_element(By.PARTIAL_LINK_TEXT, "Log in").click()
    wait_for(browser, lambda: present(browser, "login-button"))
    by_id(browser, "name").send_keys("ann")
    by_id(browser, "password").send_keys("ann-password")
    by_id(browser, "login-button").click()
    wait_for(browser, lambda: present(browser, "do-retry"))  # back on the order page
    assert f"/orders/{oid}" in browser.current_url
    wait_for(browser, lambda: refreshed(browser))  # the page's first live refresh is done
    by_id(browser, "reason-retry").send_keys("card limit raised by the customer")
    shot(browser, "order-fallout")
    by_id(browser, "do-retry").click()

    # accepted; the page follows the order live until it completes
    wait_for(browser, lambda: "retry accepted" in browser.find_element(
        By.CSS_SELECTOR, ".flash").text)
    wait_for(browser, lambda: by_id(browser, "order-state").text == "completed", timeout=20)
    history = wait_for(browser, lambda: by_id(browser, "history").text)
    assert "operator ann asked to retry: card limit raised by the customer" in history
    assert stack.client.get(oid)["order"]["state"] == "completed"
    browser.execute_script("document.getElementById('summary').scrollIntoView();")
    shot(browser, "order-completed")
    browser.find_element(By.ID, "logout").click()
    wait_for(browser, lambda: present(browser, "login-link"))  # logged out, on the overview
    print(f"\nbrowser walk-through: {time.monotonic() - started:.1f} s")


@pytest.mark.slow
def test_browser_pages_of_errors(stack: Stack, browser: Any) -> None:
    browser.get(stack.url + "/orders/O999999999999")
    wait_for(browser, lambda: "There is no order O999999999999" in by_id(browser, "error").text)
    browser.get(stack.url + "/search?state=nonsense")
    wait_for(browser, lambda: "Unknown state" in by_id(browser, "error").text)


def test_console_docs_screenshots_exist() -> None:
    """docs/console.md shows PNGs the browser test took; they are committed."""
    doc = (ROOT / "docs/console.md").read_text()
    images = re.findall(r"\]\((console/[\w-]+\.png)\)", doc)
    assert images
    for image in images:
        data = (ROOT / "docs" / image).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 400_000, image



def test_order_page_renders_the_engines_fallout_block_and_odd_views() -> None:
    """The order view's ``fallout`` block (agreed shape) drives the page: its
    step, item, error, hint and actions; views without it, or with fields of
    the wrong kind, still render."""
    from flask import render_template

    from console.app import Settings, create_app
    from console.backend import Backend
    from console.views import actions_for, order_context

    app = create_app(Settings(intake="tcp://127.0.0.1:1", events="tcp://127.0.0.1:1"),
                     Backend("tcp://127.0.0.1:1"), None)
    held = {"order_id": "O000000000007", "state": "held", "state_reason": "internal_error",
            "source_system": "shop", "external_id": "X-7", "steps": [], "items": [],
            "history": [], "fallout": {
                "step": "activate[i2]", "item": "i2", "compensation": False,
                "error": {"code": "unknown_service", "message": "no service 42"},
                "reason": "internal_error", "actions": ["retry", "abort", "explode"],
                "hint": "Check service 42 with provisioning, then retry."}}
    assert actions_for(held) == ["retry", "abort"]
    assert actions_for({"state": "completed"}) == []
    assert actions_for({"state": "inProgress", "state_reason": "compensating"}) == []
    assert actions_for({"state": "held", "state_reason": "fallout"}) == [
        "retry", "skip", "abort", "cancel"]
    odd = {"order_id": "O1", "state": "held", "state_reason": "fallout", "created_ts": "x",
           "failure": {"step": "s", "error": "not a map"}, "fallout": "not a map",
           "steps": [{"name": "s", "status": "failed", "result": [1, 2], "error": "boom"}],
           "history": [{"ts": None, "state": "held"}], "summary": {"total_minor": 1.5}}
    with app.test_request_context("/orders/O000000000007"):
        page = render_template("_order_live.html", **order_context(held))
        assert "activate[i2]" in page and "(item i2)" in page and "unknown_service" in page
        assert "Check service 42 with provisioning, then retry." in page
        assert "<strong>retry</strong>" in page and "explode" not in page
        odd_page = render_template("_order_live.html", **order_context(odd))
        assert "Why it is held" in odd_page and "boom" in odd_page


def test_money_is_written_with_the_currencys_own_minor_units() -> None:
    from console.views import money

    assert money(123456, "EUR") == "1,234.56 EUR"
    assert money(123456, "JPY") == "123,456 JPY"
    assert money(123456, "KWD") == "123.456 KWD"
    assert money(-5, "USD") == "-0.05 USD"
    assert money(2**63 - 1, "EUR") == "92,233,720,368,547,758.07 EUR"  # exact, no float
    assert money(100, None) == "1.00" and money(True, "EUR") == "" and money("1", "EUR") == ""
