"""Parse OpenXLA's embedded GPU perf tables (textproto in C++ headers) into CSVs.

Usage: python parse_xla_tables.py RAW_DIR OUT_DIR

RAW_DIR must hold the raw header texts saved as <stored-file-id>.txt (see
README.md for the ids, repos, paths and commits). The raw headers are OpenXLA
source files and are not kept in this repository.
"""
import csv
import math
import re
import sys
from pathlib import Path

# id -> (table kind, openxla/xla commit whose blob has exactly this table text)
SOURCES = {
    "1329180006": ("matmul", "71feeddf7cc3c9c7878eee18ea43c983631e6e84"),
    "1896262286": ("collective", "6984b93376fba7a8f15b0f022add783a2ae650ad"),
}
NEWEST_MATMUL = "1329180006"

# Bytes per element for XLA PrimitiveType names.
ELEMENT_BYTES = {
    "PRED": 1, "S8": 1, "U8": 1, "S16": 2, "U16": 2, "S32": 4, "U32": 4,
    "S64": 8, "U64": 8, "F16": 2, "BF16": 2, "F32": 4, "F64": 8, "C64": 8,
    "C128": 16, "F8E4M3FN": 1, "F8E5M2": 1, "F8E4M3B11FNUZ": 1,
    "F8E4M3FNUZ": 1, "F8E5M2FNUZ": 1, "F8E4M3": 1, "F8E3M4": 1,
}

TOKEN = re.compile(r'\s*(?:(\{)|(\})|(:)|("(?:[^"\\]|\\.)*")|([A-Za-z0-9_.+-]+))')


def extract_textproto(text):
    m = re.search(r'R"pb\((.*)\)pb"', text, re.S)
    if not m:
        raise ValueError("no R\"pb(...)pb\" literal found")
    return m.group(1)


def tokenize(s):
    pos, out = 0, []
    while True:
        m = TOKEN.match(s, pos)
        if not m:
            if s[pos:].strip():
                raise ValueError(f"cannot tokenize at {pos}: {s[pos:pos+40]!r}")
            return out
        pos = m.end()
        lb, rb, colon, string, word = m.groups()
        if lb:
            out.append(("{", None))
        elif rb:
            out.append(("}", None))
        elif colon:
            out.append((":", None))
        elif string is not None:
            out.append(("str", bytes(string[1:-1], "utf-8").decode("unicode_escape")))
        else:
            out.append(("word", word))


def parse_message(tokens, i=0):
    """Returns (dict field -> list of values, next index). Messages are dicts."""
    msg = {}
    while i < len(tokens):
        kind, val = tokens[i]
        if kind == "}":
            return msg, i + 1
        if kind != "word":
            raise ValueError(f"expected field name at token {i}, got {tokens[i]}")
        name = val
        i += 1
        if tokens[i][0] == ":":
            i += 1
        if tokens[i][0] == "{":
            sub, i = parse_message(tokens, i + 1)
            msg.setdefault(name, []).append(sub)
        else:
            msg.setdefault(name, []).append(tokens[i][1])
            i += 1
    return msg, i


def first(msg, field, default=None):
    v = msg.get(field)
    return v[0] if v else default


def parse_table(text):
    root, _ = parse_message(tokenize(extract_textproto(text)))
    return [(first(e, "key"), first(e, "value", {})) for e in root.get("entries", [])]


def matmul_rows(path, commit):
    rows = []
    for gpu_key, value in parse_table(path.read_text()):
        for e in value.get("entries", []):
            b, m, n, k = (int(first(e, f, 0)) for f in ("b", "m", "n", "k"))
            for fl in e.get("flops", []):
                rows.append({
                    "gpu_key": gpu_key, "b": b, "m": m, "n": n, "k": k,
                    "dtypes": first(fl, "key", ""),
                    "flops_per_s": float(first(fl, "value", 0)),
                    "source_commit": commit,
                })
    return rows


def collective_rows(path, commit):
    rows = []
    for gpu_key, value in parse_table(path.read_text()):
        for e in value.get("entries", []):
            ins = first(e, "instruction", {})
            shape = first(ins, "shape", {})
            if shape.get("tuple_shapes"):
                raise ValueError("tuple shapes not handled")
            etype = first(shape, "element_type", "")
            dims = [int(d) for d in shape.get("dimensions", [])]
            elements = math.prod(dims)
            cdl = first(ins, "collective_device_list", {})
            iota = first(cdl, "iota_replica_group_list") or first(
                ins, "iota_collective_device_list")
            if iota is None and (ins.get("replica_groups") or cdl.get("replica_groups")):
                raise ValueError("explicit replica_groups not handled")
            pairs = ins.get("source_target_pairs", [])
            rows.append({
                "gpu_key": gpu_key,
                "opcode": first(ins, "opcode", ""),
                "element_type": etype,
                "elements": elements,
                "bytes": elements * ELEMENT_BYTES[etype],
                # Byte count the generator divided by the median runtime
                # (its tensor_size_bytes): equals the operand size for
                # reduce-scatter (= result bytes x group size) and the result
                # size for every other opcode.
                "throughput_basis_bytes": elements * ELEMENT_BYTES[etype] * (
                    int(first(iota, "num_devices_per_group", 1))
                    if first(ins, "opcode") == "reduce-scatter" else 1),
                "num_replica_groups": int(first(iota, "num_replica_groups", 0)) if iota else "",
                "devices_per_group": int(first(iota, "num_devices_per_group", 0)) if iota else "",
                "iota_reshape_dims": " ".join(iota.get("iota_reshape_dims", [])) if iota else "",
                "iota_transpose_perm": " ".join(iota.get("iota_transpose_perm", [])) if iota else "",
                "source_target_pairs": " ".join(
                    f"{first(p, 'source', '0')}>{first(p, 'target', '0')}" for p in pairs),
                "network_throughput_bytes_per_sec": float(
                    first(e, "network_throughput_bytes_per_sec", 0)),
                "source_commit": commit,
            })
    return rows


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    print(f"{path.name}: {len(rows)} rows")


def key_suffix(gpu_key):
    return gpu_key.replace("sm_", "sm")


def main(raw_dir, out_dir):
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    newest = matmul_rows(raw_dir / f"{NEWEST_MATMUL}.txt", SOURCES[NEWEST_MATMUL][1])
    for key in sorted({r["gpu_key"] for r in newest}):
        write_csv(out_dir / f"matmul_{key_suffix(key)}.csv",
                  [r for r in newest if r["gpu_key"] == key])
    coll = collective_rows(raw_dir / "1896262286.txt", SOURCES["1896262286"][1])
    for key in sorted({r["gpu_key"] for r in coll}):
        write_csv(out_dir / f"collectives_{key_suffix(key)}.csv",
                  [r for r in coll if r["gpu_key"] == key])


if __name__ == "__main__":
    main(*sys.argv[1:3])
