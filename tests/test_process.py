"""Process definitions: loading, validation with file/key errors, did-you-mean."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.settings import load_processes
from oms.process import ProcessError, builtin_processes, parse_process

MINIMAL = """
[process]
order_type = "return"
[steps.receive]
system = "warehouse"
op = "receive_return"
args = { items = "$order.stock_items" }
[steps.refund]
after = ["receive"]
system = "billing"
op = "refund_payment"
args = { payment_id = "$order.attributes.payment_id" }
"""


def test_builtin_processes_load() -> None:
    procs = builtin_processes()
    assert set(procs) >= {"retail", "telecom"}
    assert procs["retail"].point_of_no_return == "create_shipment"
    assert procs["telecom"].sequencing_key == "customer.id"
    assert procs["telecom"].step("provision").per_item is not None


def test_directory_adds_and_overrides(tmp_path: Path) -> None:
    (tmp_path / "return.toml").write_text(MINIMAL)
    procs = load_processes(tmp_path)
    assert procs["return"].step("refund").after == ("receive",)
    assert "retail" in procs


@pytest.mark.parametrize(("change", "expected"), [
    (("after = [\"receive\"]", "after = [\"recieve\"]"),
     "steps.refund.after: unknown step 'recieve' (did you mean 'receive'?)"),
    (("op = \"refund_payment\"", "op = \"refund_payment\"\ntimeout = 3"),
     "steps.refund.timeout: unknown key (did you mean 'timeout_s'?)"),
    (("$order.stock_items", "$order.stok_items"),
     "unknown order field (did you mean $order.stock_items?)"),
    (("[process]", "[process]\nfailure_policy = \"hodl\""),
     "process.failure_policy: must be one of compensate, hold (did you mean 'hold'?)"),
    (("after = [\"receive\"]", "after = [\"receive\", \"refund\"]"),
     "dependency cycle"),
])
def test_errors_name_file_and_key(change: tuple[str, str], expected: str) -> None:
    text = MINIMAL.replace(*change)
    with pytest.raises(ProcessError) as info:
        parse_process(text, "return.toml")
    assert any(expected in p and p.startswith("return.toml: ") for p in info.value.problems), (
        info.value.problems)


def test_all_problems_of_all_files_reported_together(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text(MINIMAL.replace("system = \"billing\"", ""))
    (tmp_path / "b.toml").write_text("not [valid toml")
    with pytest.raises(ProcessError) as info:
        load_processes(tmp_path)
    text = str(info.value)
    assert "a.toml: steps.refund.system: required" in text
    assert "b.toml: not valid TOML" in text


def test_unknown_step_in_after_is_reported_without_a_spurious_cycle() -> None:
    text = MINIMAL.replace('after = ["receive"]', 'after = ["recieve"]')
    with pytest.raises(ProcessError) as err:
        parse_process(text, "return.toml")
    message = str(err.value)
    assert "unknown step 'recieve'" in message and "did you mean 'receive'" in message
    assert "cycle" not in message
    real_cycle = MINIMAL.replace("[steps.receive]", '[steps.receive]\nafter = ["refund"]')
    with pytest.raises(ProcessError, match="dependency cycle among: receive, refund"):
        parse_process(real_cycle, "return.toml")


def test_show_says_when_a_wait_has_no_time_limit() -> None:
    from app.processes_cli import render_process

    text = render_process(builtin_processes()["retail"])
    assert "[await_delivery] wait for event shipment_delivered" in text
    wait_line = text.split("[await_delivery]")[1].splitlines()[1]
    assert "waits without a time limit" in wait_line and "timeout" not in wait_line
