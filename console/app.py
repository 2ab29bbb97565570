"""The console's pages: Flask routes rendering Jinja2 templates (autoescaped).

Pages: ``/`` overview, ``/search``, ``/orders/<order_id>``, ``/login``; live
updates come from ``/events`` (server-sent events, fed by the service's events
endpoint), which tells a page to fetch its fragment (``/live/...``) again.
Actions are POST forms with a required reason and a per-session CSRF token.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from flask import (
    Flask,
    Response,
    abort,
    flash,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from werkzeug.exceptions import HTTPException

from console.auth import MAX_PASSWORD, CredentialsError, User, authenticate, load_users
from console.backend import PAGE, Backend, EventFeed, ServiceDown, ServiceError
from console.views import (
    ACTIONS,
    compact,
    event_stream,
    money,
    order_context,
    overview_context,
    when,
)
from oms.states import OrderState

logger = logging.getLogger(__name__)

STATES = [str(s) for s in OrderState]
ORDER_ID = re.compile(r"[A-Za-z0-9._:-]{1,100}")
NOT_AN_ORDER_ID = "That is not an order id (letters, digits and . _ : - only)."
FIELD_MAX = 200
CURSOR_MAX = 8000  # a sharded front's list_orders cursor (shards.front_fanout.parse_cursor)
REASON_MAX = 500


@dataclass
class Settings:
    intake: str
    events: str
    users_file: str | None = None  # None: nobody can log in, the console is read-only
    read_only: bool = False  # no actions and no logins, whatever the users file says
    private: bool = False  # every page needs a login (any role)
    max_streams: int = 32  # live pages at once (each holds a server thread)
    stream_s: float = 300.0  # a live stream ends after this; the browser reconnects
    service_timeout: float = 3.0

    @property
    def can_login(self) -> bool:
        return bool(self.users_file) and not self.read_only


def create_app(settings: Settings, backend: Backend, feed: EventFeed | None) -> Flask:
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=secrets.token_bytes(32),  # sessions end when the console restarts
        SESSION_COOKIE_NAME="oms_console",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        MAX_CONTENT_LENGTH=64 * 1024,
        TEMPLATES_AUTO_RELOAD=False,
    )
    app.jinja_env.filters["when"] = when
    app.jinja_env.filters["compact"] = compact
    app.jinja_env.filters["money"] = money
    streams = threading.BoundedSemaphore(settings.max_streams)
    checks = threading.BoundedSemaphore(2)  # password checks at once: scrypt costs ~60 ms

    # -- every request ----------------------------------------------------

    @app.before_request
    def who_and_csrf() -> Any:
        g.user = _current_user(settings)
        if "csrf" not in session:
            session["csrf"] = secrets.token_urlsafe(32)
        if request.method == "POST":
            origin = request.headers.get("Origin")
            if origin and origin != "null" and urlsplit(origin).netloc != request.host:
                abort(403, "This form was sent from another site; it was refused.")
            sent = request.form.get("csrf", "")
            if not secrets.compare_digest(sent.encode(), str(session["csrf"]).encode()):
                abort(403, "This form has expired or did not come from this console "
                      "(missing or wrong security token). Reload the page and try again.")
        if (settings.private and g.user is None
                and request.endpoint not in ("login", "static")):
            return redirect(url_for("login", next=request.full_path))
        return None

    @app.after_request
    def headers(resp: Response) -> Response:
        resp.headers["Content-Security-Policy"] = (
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'")
        resp.headers["X-Frame-Options"] = "DENY"
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "same-origin"
        resp.headers.setdefault("Cache-Control", "no-store")
        return resp

    @app.context_processor
    def common() -> dict[str, Any]:
        user = g.get("user")
        return {"user": user, "csrf": session.get("csrf", ""), "settings": settings,
                "may_act": _may_act(settings, user), "states": STATES}

    # -- errors: a clear page, never a stack trace -------------------------

    @app.errorhandler(ServiceDown)
    def service_down(exc: ServiceDown) -> Any:
        if request.method == "POST":  # the request may have arrived: say so, do not guess
            return render_template(
                "error.html", title="The service does not answer",
                message=f"{exc}. The action may or may not have been carried out: open "
                "the order again once the service answers, and look at its history before "
                "you repeat it."), 503
        return render_template("error.html", title="The service does not answer",
                               message=f"{exc}. It may be down, restarting or recovering. "
                               "Nothing was changed by this page; try again in a moment.",
                               retry=True), 503

    @app.errorhandler(ServiceError)
    def service_error(exc: ServiceError) -> Any:
        status = 403 if exc.code == "unauthorized" else 400 if exc.code == "malformed" else 502
        return render_template("error.html", title="The service refused the request",
                               message=f"{exc.code}: {exc.message}"), status

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Any:
        titles = {400: "Bad request", 403: "Not allowed", 404: "Not found",
                  405: "Not allowed", 413: "Too large"}
        message = exc.description if exc.code != 405 else "This address does not take that."
        return render_template("error.html", title=titles.get(exc.code or 500, exc.name),
                               message=message), exc.code or 500

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Any:
        # Flask runs error handlers inside its own except block: the traceback is there
        logger.exception("console page failed: %s %s", request.method, request.path)  # noqa: LOG004
        return render_template("error.html", title="Something went wrong in the console",
                               message="The error is in the console's log. The service "
                               "and the orders are not affected."), 500

    # -- pages -------------------------------------------------------------

    @app.get("/")
    def overview() -> Any:
        return render_template("overview.html", **overview_context(backend, feed))

    @app.get("/live/overview")
    def overview_live() -> Any:
        return render_template("_overview_live.html", **overview_context(backend, feed))

    @app.get("/search")
    def search() -> Any:
        filters = {k: _field(k) for k in ("order_id", "external_id", "source_system",
                                          "customer_id", "state", "state_reason")}
        after = _field("after", CURSOR_MAX)
        if filters["state"] and filters["state"] not in STATES:
            abort(400, f"Unknown state {filters['state']!r}; one of {', '.join(STATES)}.")
        if filters["order_id"]:  # checked as on its page: no redirect to what was typed
            if not _valid_id(filters["order_id"]):
                abort(400, NOT_AN_ORDER_ID)
            return redirect(url_for("order_page", order_id=filters["order_id"]))
        if filters["external_id"] and filters["source_system"]:
            view = backend.find_external(filters["source_system"], filters["external_id"])
            if view is not None:
                return redirect(url_for("order_page", order_id=view["order_id"]))
        searched = any(filters.values()) or "go" in request.args
        rows, nxt = backend.search(filters, after) if searched else ([], None)
        query = {k: v for k, v in filters.items() if v}
        return render_template("search.html", filters=filters, rows=rows, next=nxt,
                               after=after, searched=searched, page=PAGE,
                               query=dict(query, go=1))

    @app.get("/orders/<order_id>")
    def order_page(order_id: str) -> Any:
        view = _order_or_404(backend, order_id)
        return render_template("order.html", **order_context(view))

    @app.get("/live/orders/<order_id>")
    def order_live(order_id: str) -> Any:
        view = _order_or_404(backend, order_id)
        return render_template("_order_live.html", **order_context(view))

    @app.post("/orders/<order_id>/<action>")
    def act(order_id: str, action: str) -> Any:
        if action not in ACTIONS:
            abort(404, f"There is no action {action!r}.")
        if not _valid_id(order_id):
            abort(400, "That is not an order id.")
        user: User | None = g.user
        if settings.read_only or not settings.can_login:
            abort(403, "This console is read-only: actions are turned off.")
        if user is None:
            abort(403, "Log in as an operator to act on orders.")
        if not user.may_act:
            abort(403, f"{user.name} may look at orders but not act on them "
                  f"(role {user.role}).")
        reason = request.form.get("reason", "").strip()
        if not reason:
            abort(400, "A reason is required: it is recorded in the order's history.")
        if len(reason) > REASON_MAX:
            abort(400, f"The reason is too long (at most {REASON_MAX} characters).")
        step = request.form.get("step", "").strip() or None
        reply = backend.act(action, order_id, user.name, reason, step)
        kind = reply.get("type")
        if kind in ("operator_accepted", "cancel_accepted"):
            flash(f"{action} accepted: the order is now {reply.get('state')}.", "ok")
            logger.info("operator %s: %s %s (%s)", user.name, action, order_id, reason)
        elif kind in ("operator_rejected", "cancel_rejected"):
            flash(f"{action} refused by the service: {reply.get('reason')}.", "error")
        elif kind == "error" and reply.get("code") == "not_found":
            abort(404, f"There is no order {order_id}.")
        else:
            flash(f"{action} failed: {reply.get('code')}: {reply.get('message')}", "error")
        return redirect(url_for("order_page", order_id=order_id))

    @app.route("/login", methods=["GET", "POST"])
    def login() -> Any:
        if not settings.can_login:
            abort(403, "Logins are turned off: this console is read-only.")
        error = None
        if request.method == "POST":
            name = request.form.get("name", "")[:64]
            password = request.form.get("password", "")
            user = None
            if len(password) <= MAX_PASSWORD:
                try:
                    with checks:  # guessing in parallel cannot take every core
                        user = authenticate(load_users(settings.users_file or ""), name,
                                            password)
                except CredentialsError as exc:
                    logger.error("credentials file: %s", exc)
                    abort(503, "The console's credentials file cannot be read; "
                          "see the console's log.")
            if user is not None:
                session.clear()  # a new session (and CSRF token) for the logged-in user
                session["user"], session["csrf"] = user.name, secrets.token_urlsafe(32)
                logger.info("%s logged in (%s)", user.name, user.role)
                nxt = request.args.get("next", "")
                return redirect(nxt if _local(nxt) else url_for("overview"))
            error = "Wrong name or password."
        return render_template("login.html", error=error), 401 if error else 200

    @app.post("/logout")
    def logout() -> Any:
        session.clear()
        return redirect(url_for("overview"))

    @app.get("/events")
    def events() -> Any:
        if feed is None:
            abort(404, "Live updates are off.")
        if not streams.acquire(blocking=False):
            return Response("retry: 10000\n\n", status=503, mimetype="text/event-stream")
        q = feed.listen()
        done = threading.Event()

        def cleanup() -> None:  # once, whether or not the stream was ever read
            if not done.is_set():
                done.set()
                feed.unlisten(q)
                streams.release()

        resp = Response(event_stream(q, settings.stream_s), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
        resp.call_on_close(cleanup)
        return resp

    @app.get("/healthz")
    def healthz() -> Any:
        return Response("ok\n", mimetype="text/plain")

    return app


# -- helpers -------------------------------------------------------------------


def _current_user(settings: Settings) -> User | None:
    """The logged-in user, re-read from the credentials file (a removed user or
    a changed role takes effect at once)."""
    name = session.get("user")
    if not name or not settings.can_login:
        return None
    try:
        return load_users(settings.users_file or "").get(name)
    except CredentialsError as exc:
        logger.error("credentials file: %s", exc)
        return None


def _may_act(settings: Settings, user: User | None) -> bool:
    return settings.can_login and user is not None and user.may_act


def _field(name: str, most: int = FIELD_MAX) -> str:
    value = request.args.get(name, "").strip()
    if len(value) > most:
        abort(400, f"{name} is too long (at most {most} characters).")
    return value


def _valid_id(order_id: str) -> bool:
    return bool(ORDER_ID.fullmatch(order_id))


def _local(target: str) -> bool:
    r"""A path on this console. Browsers read ``/\host`` as ``//host`` and drop
    tabs and newlines anywhere (``/<TAB>/host``): such a target is not local."""
    if any(c == "\\" or ord(c) < 0x21 or ord(c) == 0x7F for c in target):
        return False
    parts = urlsplit(target)
    return bool(target) and target.startswith("/") and not target.startswith("//") and not (
        parts.scheme or parts.netloc)


def _order_or_404(backend: Backend, order_id: str) -> dict[str, Any]:
    if not _valid_id(order_id):
        abort(400, NOT_AN_ORDER_ID)
    view = backend.get_order(order_id)
    if view is None:
        abort(404, f"There is no order {order_id}. Search by external id or customer "
              "if you do not know the order id.")
    return view
