"""The pure parts of #14: `[LABEL=][LOCAL:]PORT`, and where an app's forward goes."""

from __future__ import annotations

from dataclasses import replace

import pytest

from jlremote.options import parse_forward, parse_forwards
from jlremote.ssh import Target
from jlremote.state import AppForward
from tests.unit.test_state import make


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("6006", AppForward("6006", 0, 6006)),
        ("tensorboard=6006", AppForward("tensorboard", 0, 6006)),
        ("16006:6006", AppForward("6006", 16006, 6006)),
        ("tb=16006:6006", AppForward("tb", 16006, 6006)),
        (" dask.ui-2=8787 ", AppForward("dask.ui-2", 0, 8787)),
    ],
)
def test_forward_specs(text: str, spec: AppForward) -> None:
    assert parse_forward(text) == spec


@pytest.mark.parametrize(
    ("texts", "words"),
    [
        (["0"], "0 is not a port"),
        (["70000"], "70000 is not a port"),
        (["tb=99999:6006"], "99999 is not a port"),
        (["x y"], "not [LABEL=][LOCAL:]PORT"),
        (["=6006"], "not [LABEL=][LOCAL:]PORT"),
        (["9tb=6006"], "not [LABEL=][LOCAL:]PORT"),
        (["a=1", "a=2"], "the label 'a' is given twice"),
        (["6006", "tb=6006"], "port '6006' is given twice"),
        (["a=9:1", "b=9:2"], "local port '9' is given twice"),
    ],
)
def test_bad_forward_specs(texts: list[str], words: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_forwards(texts)
    assert words in str(err.value)


def test_an_apps_target_is_beside_the_server() -> None:
    plain = make("a")
    assert plain.app_target(6006) == Target(6006)  # the remote's own 127.0.0.1
    job = replace(plain, server=replace(plain.server, job_id="42", address="10.1.2.7"))
    assert job.app_target(6006) == Target(6006, host="10.1.2.7")  # the node, via login
    on_node = replace(job, tunnel=replace(job.tunnel, node="gpu017"))
    assert on_node.app_target(6006) == Target(6006)  # the connection ends at the node
