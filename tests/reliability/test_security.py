"""What moewatch exposes, and what it refuses to trust (see SECURITY.md).

* the metrics endpoint binds to 127.0.0.1 unless an address is given, and it is the package's only
  listening socket;
* no pickle, no ``torch.load`` without ``weights_only=True``, no eval/exec anywhere in the package;
* baselines and dumps are data: a file full of code-like content and pickles is read as text;
* label values (gate module names) are escaped in the exposition, whatever characters they hold;
* automatic dumps stay inside ``dump_dir``, and pruning never follows a link out of it.
"""
from __future__ import annotations

import ast
import inspect
import json
import os
import pathlib
import pickle
import re
import socket
import urllib.request

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_prometheus

import moewatch
from moewatch.dump import METADATA_KEY, read_dump
from moewatch.export.prometheus import PrometheusEndpoint, serve

from reliability_helpers import ToyMoE, assert_bit_identical, forward

PACKAGE = pathlib.Path(moewatch.__file__).parent
WEIRD = ['say "hi"', "back\\slash", "new\nline", 'all "of\\ them\n', "slash/and\\back"]


def sources():
    return sorted(PACKAGE.rglob("*.py"))


def endpoints(mon) -> list:
    return [e for e in mon._exporters if isinstance(e, PrometheusEndpoint)]


def local_non_loopback_address():
    """An address of this host that is not loopback, or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent for a UDP connect
            address = sock.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def toy_monitor(**options):
    model = ToyMoE()
    return model, moewatch.attach(model, gates="routers.*", top_k=2, background=False, model_name="toy", **options)


def test_metrics_endpoint_binds_to_loopback_unless_told_otherwise():
    assert inspect.signature(moewatch.Monitor.serve_prometheus).parameters["addr"].default == "127.0.0.1"
    assert inspect.signature(serve).parameters["addr"].default == "127.0.0.1"
    model, mon = toy_monitor()
    try:
        port = mon.serve_prometheus(port=0)
        (endpoint,) = endpoints(mon)
        assert endpoint._server.server_address[0] == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
            assert b"moewatch_up" in response.read()
        other = local_non_loopback_address()
        if other is not None:  # reachable from the host's own network address: it must not be
            with pytest.raises(OSError):
                socket.create_connection((other, port), timeout=5).close()
        given = mon.serve_prometheus(port=0, addr="127.0.0.2")  # an address given is used
        assert endpoints(mon)[1]._server.server_address == ("127.0.0.2", given)
    finally:
        mon.detach()


def test_the_metrics_endpoint_is_the_only_listening_socket_in_the_package():
    listening = []
    for path in sources():
        text = path.read_text()
        for needle in ("start_http_server", "HTTPServer", "serve_forever", ".bind(", ".listen(", "socketserver",
                       "create_server"):
            if needle in text:
                listening.append((path.relative_to(PACKAGE).as_posix(), needle))
    assert sorted(set(listening)) == [("export/http.py", "create_server")]


UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def unsafe_calls(tree: ast.AST):
    """(line, what) for every construct that can run code from data."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in UNSAFE_MODULES:
                    yield node.lineno, f"import {alias.name}"
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            yield node.lineno, f"from {node.module} import"
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
            keywords = {k.arg: k.value for k in node.keywords}
            if name in ("eval", "exec") and isinstance(func, ast.Name):  # not model.eval()
                yield node.lineno, name
            elif name == "load" and owner == "torch":
                flag = keywords.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    yield node.lineno, "torch.load without weights_only=True"
            elif name == "load" and owner == "yaml":
                yield node.lineno, "yaml.load (use yaml.safe_load)"
            elif name == "read_pickle" or name == "from_pickle":
                yield node.lineno, name
            elif "allow_pickle" in keywords and not (isinstance(keywords["allow_pickle"], ast.Constant)
                                                      and keywords["allow_pickle"].value is False):
                yield node.lineno, "allow_pickle"


def test_no_pickle_torch_load_or_eval_anywhere_in_the_package():
    found = [(p.relative_to(PACKAGE).as_posix(), line, what)
             for p in sources() for line, what in unsafe_calls(ast.parse(p.read_text(), filename=str(p)))]
    assert found == []
    # the checker itself catches each construct
    bad = ("import pickle\nfrom dill import loads\ntorch.load(f)\ntorch.load(f, weights_only=False)\n"
           "eval(s)\nyaml.load(s)\nnp.load(f, allow_pickle=True)\npd.read_pickle(f)\nmodel.eval()\n")
    assert len(list(unsafe_calls(ast.parse(bad)))) == 8
    assert list(unsafe_calls(ast.parse("torch.load(f, weights_only=True)\nnp.load(f)\n"))) == []


def test_pyarrow_that_cannot_unpickle_from_a_file_is_required():
    """PyArrow before 14.0.1 unpickles extension types found in a file (CVE-2023-47248)."""
    text = (PACKAGE.parent / "pyproject.toml").read_text()
    (line,) = [l for l in text.splitlines() if l.strip().startswith('"pyarrow')]
    floor = tuple(int(p) for p in re.search(r'"pyarrow>=([0-9.]+)"', line).group(1).split("."))
    assert floor >= (14, 0, 1)
    assert tuple(int(p) for p in pa.__version__.split(".")[:3]) >= (14, 0, 1)


class _Tripwire:
    """Unpickling this creates a file: proof that some reader ran code from data."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_baselines_and_dumps_are_data_never_code(tmp_path):
    wire = str(tmp_path / "code-ran")
    payload = pickle.dumps(_Tripwire(wire))
    assert not os.path.exists(wire)

    # a baseline whose strings look like code, with a pickle (as latin-1 text) in its meta
    model, mon = toy_monitor(window_tokens=10)
    try:
        for seed in range(10):
            forward(model, torch.randn(1, 10, 8, generator=torch.Generator().manual_seed(seed)))
            mon.flush()
        data = mon.baseline().to_dict()
    finally:
        mon.detach()
    data["model_name"] = "__import__('os').system('touch " + wire + "')"
    data["meta"] = {"pickle": payload.decode("latin-1"), "__reduce__": "open"}
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(data))
    base = moewatch.Baseline.load(path)
    assert base.model_name.startswith("__import__") and base.meta["pickle"] == payload.decode("latin-1")

    # a dump with a pickle in a string column and in its footer metadata
    good = mon.dump(tmp_path / "good.parquet")
    table = pq.read_table(good)
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    meta["reason"] = payload.decode("latin-1")
    renamed = {g["name"]: payload.decode("latin-1") + str(i) for i, g in enumerate(meta["gates"])}
    for g in meta["gates"]:
        g["name"] = renamed[g["name"]]
    gate = table.column_names.index("gate")
    table = table.set_column(gate, "gate", pa.array([renamed[n] for n in table.column("gate").to_pylist()]))
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode(),
                                           b"pickle": payload})
    evil = tmp_path / "evil.parquet"
    pq.write_table(table, evil)
    dump = read_dump(evil)
    assert dump.metadata["reason"] == payload.decode("latin-1")
    assert set(dump.windows["gate"]) == set(renamed.values())
    assert not os.path.exists(wire)


def scrape(port: int, openmetrics: bool) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if openmetrics:
        request.add_header("Accept", "application/openmetrics-text; version=1.0.0")
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read().decode()


@pytest.mark.parametrize("openmetrics", [False, True])
def test_label_values_are_escaped_in_the_exposition(openmetrics):
    """Gate module names with quotes, backslashes and newlines (a user gate pattern) come back
    exactly from a parser of the scraped text, and never break a line of the exposition."""
    model = ToyMoE(names=WEIRD)
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))
    expected = forward(model, x)
    with moewatch.attach(model, gates="routers.*", top_k=2, background=False,
                         model_name='m"od\\el\n') as mon:
        assert_bit_identical(forward(model, x), expected)
        mon.flush()
        text = scrape(mon.serve_prometheus(port=0), openmetrics)
    for line in text.splitlines():
        assert line.startswith(("#", "moewatch_")), line
    parse = parse_openmetrics if openmetrics else parse_prometheus
    tokens = {}
    for family in parse(text):
        for sample in family.samples:
            if sample.name == "moewatch_gate_tokens_total":
                assert sample.labels["model"] == 'm"od\\el\n'
                tokens[sample.labels["layer"]] = sample.value
    assert tokens == {f"routers.{name}": 6.0 for name in WEIRD}


def collapse_run(model, folder, **options) -> list:
    """Traffic through a collapsed router until the detector says so; returns the automatic dumps."""
    with moewatch.attach(model, gates="routers.*", top_k=2, background=False, dump_dir=str(folder),
                         **options) as mon:
        for seed in range(4):
            forward(model, torch.randn(4, 64, 8, generator=torch.Generator().manual_seed(seed)))
            mon.flush()
        assert mon.health().severity == "collapse"
        post = mon._postmortem
    assert mon.error_counts() == {}
    return list(post.written)


def test_automatic_dumps_stay_inside_dump_dir_and_pruning_never_follows_links(tmp_path):
    """A collapse on gates named with slashes, backslashes and newlines writes its dump inside
    dump_dir under a portable name; a link planted there under a dump's name is neither counted
    nor removed by pruning, and neither is its target."""
    folder = tmp_path / "dumps"
    model = ToyMoE(names=("a/b\\c", "d\ne"), skew=True)
    written = collapse_run(model, folder)
    assert [("collapse" in w, "shutdown" in w) for w in written] == [(True, False), (False, True)]
    for path in written:
        assert os.path.dirname(path) == str(folder)
        assert set(os.path.basename(path)) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
        assert set(read_dump(path).windows["gate"]) == {"routers.a/b\\c", "routers.d\ne"}
    assert sorted(os.listdir(tmp_path)) == ["dumps"]

    outside = tmp_path / "precious.parquet"
    outside.write_bytes(b"not moewatch's to delete" * 10000)
    planted = folder / "moewatch-19700101T000000000000Z-1-planted.parquet"
    planted.symlink_to(outside)
    budget = int(max(os.path.getsize(p) for p in written) * 1.5)  # room for one dump: pruning runs
    again = collapse_run(model, folder, dump_max_bytes=budget)
    left = sorted(os.listdir(folder))
    assert left == sorted([planted.name, os.path.basename(again[-1])])  # older real dumps pruned
    assert planted.is_symlink() and outside.stat().st_size == len(b"not moewatch's to delete") * 10000


def test_dumps_never_carry_url_credentials():
    from moewatch.dump import options_metadata
    from moewatch.options import Options

    options = Options(alertmanager_url="http://am-user:am-secret@127.0.0.1:9093",
                      otlp_endpoint="http://otlp-user:otlp-secret@127.0.0.1:4318/v1/metrics")
    text = str(options_metadata(options))
    assert "secret" not in text and "user" not in text
    assert "127.0.0.1:4318/v1/metrics" in text and "127.0.0.1:9093" in text

