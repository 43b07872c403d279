"""``pipeline/io/storage.py`` on real local files (no Ray, no network): format detection,
input listing (hidden files, globs, mixed or unknown formats), the output checks
(``prepare_output``, ``remove_files``) and input/output disjointness."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.io.errors import InputError, OutputError
from pipeline.io.storage import (check_disjoint, detect_format, list_inputs, prepare_output,
                                 remove_files)
from tests.helpers import files_under, sample_parquet, write_bytes
from tests.s3server import s3_bucket, s3_endpoint  # noqa: F401


# ---------------------------------------------------------------------------------------------
# detect_format


@pytest.mark.parametrize("name,forced,want", [
    ("a.parquet", "auto", ("parquet", None)),
    ("dir/A.PQ", "auto", ("parquet", None)),
    ("a.jsonl", "auto", ("jsonl", None)),
    ("a.json", "auto", ("jsonl", None)),
    ("a.ndjson", "auto", ("jsonl", None)),
    ("s3://b/x/a.jsonl.gz", "auto", ("jsonl", "gzip")),
    ("a.json.zst", "auto", ("jsonl", "zstd")),
    ("a.ndjson.zstd", "auto", ("jsonl", "zstd")),
    ("a.csv", "auto", (None, None)),
    ("a.txt.gz", "auto", (None, "gzip")),
    ("a.parquet.gz", "auto", (None, "gzip")),
    ("a.txt", "jsonl", ("jsonl", None)),
    ("a.log.gz", "jsonl", ("jsonl", "gzip")),
    ("a.bin", "parquet", ("parquet", None)),
    ("a.bin.gz", "parquet", (None, "gzip")),
])
def test_detect_format(name, forced, want):
    assert detect_format(name, forced) == want


# ---------------------------------------------------------------------------------------------
# list_inputs


def test_list_inputs_single_file(tmp_path):
    path = sample_parquet(tmp_path / "one.parquet")
    (file,) = list_inputs(str(path))
    assert (file.uri, file.format, file.compression) == (str(path), "parquet", None)
    assert file.size == path.stat().st_size


def test_list_inputs_directory_recursive_sorted_hidden_skipped(tmp_path):
    d = tmp_path / "in"
    for rel in ["b.jsonl", "a/c.jsonl.gz", "a/b.json", "_SUCCESS", ".crc", "_tmp/x.jsonl",
                "a/.hidden.jsonl", "a/_meta.jsonl"]:
        write_bytes(d / rel, b'{"id": 1, "text": "x"}\n')
    files = list_inputs(str(d))
    assert [f.uri for f in files] == [str(d / "a/b.json"), str(d / "a/c.jsonl.gz"), str(d / "b.jsonl")]
    assert [f.compression for f in files] == [None, "gzip", None]
    assert {f.format for f in files} == {"jsonl"}


def test_the_local_listing_equals_fsspecs(tmp_path):
    """A local prefix is listed by one ``scandir`` per folder: the same files, sizes and
    versions as fsspec's ``find`` and ``info`` give, symbolic links included."""
    import os

    import fsspec

    from pipeline.io import storage

    d = tmp_path / "in"
    for rel in ["b.jsonl", "a/c.jsonl.gz", "a/deep/e/f.parquet", "_tmp/x.jsonl", "a/_meta/y.jsonl",
                ".git/z.jsonl", "a/.hidden.jsonl", "empty.jsonl"]:
        write_bytes(d / rel, b"" if rel == "empty.jsonl" else b'{"id": 1, "text": "x"}\n' * 3)
    os.symlink(d / "b.jsonl", d / "a" / "link.jsonl")
    os.symlink(tmp_path / "gone.jsonl", d / "dangling.jsonl")
    os.symlink(d / "a" / "deep", d / "dirlink")
    fs = fsspec.filesystem("file")
    want = [(p, i.get("size", 0), storage._version(i))
            for p, i in sorted(fs.find(str(d), detail=True).items())
            if not storage._hidden(p[len(str(d)):]) and storage._is_file(p, i)]
    got = storage._find_local(str(d))
    assert got == want
    assert {p.rsplit("/", 1)[1] for p, _, _ in got} >= {"f.parquet", "link.jsonl", "empty.jsonl"}
    assert all(v and v.startswith("mtime:") for _, _, v in got)


def test_list_inputs_glob(tmp_path):
    d = tmp_path / "in"
    for rel in ["b.parquet", "a.parquet", "notes.txt", "sub/c.parquet"]:
        write_bytes(d / rel, b"x")
    files = list_inputs(str(d / "*.parquet"))
    assert [f.uri for f in files] == [str(d / "a.parquet"), str(d / "b.parquet")]


def test_list_inputs_forced_format(tmp_path):
    write_bytes(tmp_path / "in" / "a.txt", b"{}\n")
    (file,) = list_inputs(str(tmp_path / "in"), forced_format="jsonl")
    assert file.format == "jsonl"


def test_list_inputs_missing_path(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        list_inputs(str(tmp_path / "nope"))


def test_list_inputs_glob_matching_nothing(tmp_path):
    (tmp_path / "in").mkdir()
    with pytest.raises(InputError):
        list_inputs(str(tmp_path / "in" / "*.parquet"))


def test_list_inputs_empty_directory(tmp_path):
    (tmp_path / "in").mkdir()
    with pytest.raises(InputError, match="holds no data files"):
        list_inputs(str(tmp_path / "in"))
    write_bytes(tmp_path / "hidden" / "_SUCCESS", b"")
    with pytest.raises(InputError, match="holds no data files"):
        list_inputs(str(tmp_path / "hidden"))


def test_list_inputs_unknown_suffix_lists_the_file(tmp_path):
    write_bytes(tmp_path / "in" / "a.parquet", b"x")
    write_bytes(tmp_path / "in" / "notes.csv", b"x")
    with pytest.raises(InputError, match=r"no known format.*notes\.csv"):
        list_inputs(str(tmp_path / "in"))


def test_list_inputs_mixed_formats(tmp_path):
    write_bytes(tmp_path / "in" / "a.parquet", b"x")
    write_bytes(tmp_path / "in" / "b.jsonl", b"x")
    with pytest.raises(InputError, match="mixes formats"):
        list_inputs(str(tmp_path / "in"))


def test_globs_skip_hidden_directories_and_are_checked_against_the_output(tmp_path):
    for rel in ["in/a/p.jsonl", "in/.tmp/partial.jsonl", "in/_rejects/old.jsonl"]:
        write_bytes(tmp_path / rel, b'{"id": 1, "text": "x"}\n')
    files = list_inputs(str(tmp_path / "in" / "**" / "*.jsonl"))
    assert [Path(f.uri).relative_to(tmp_path).as_posix() for f in files] == ["in/a/p.jsonl"]
    with pytest.raises(OutputError, match="inside the input"):
        check_disjoint(str(tmp_path / "in" / "**" / "*.jsonl"), str(tmp_path / "in" / "out"))
    check_disjoint(str(tmp_path / "in" / "*.jsonl"), str(tmp_path / "out"))


# ---------------------------------------------------------------------------------------------
# prepare_output, remove_files, check_disjoint


def test_prepare_output_fresh_dir_created(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    prepare_output(str(out))
    assert out.is_dir() and files_under(out) == []  # the write probe is gone


# Named as writers.part_name names them.
P1, P2 = "part-0123456789abcdef-0123456789ab.parquet", "part-fedcba9876543210-ba9876543210.parquet"
OWN = [P1, P2, "_summary.json", f"_rejects/{P1}", "_manifest/_run.json", "_manifest/unit-abc.json",
       "_manifest/.unit-def.json.tmp-1a2b3c4d", "_manifest/deeper/anything",
       ".part-abc-0123456789ab.parquet.tmp-deadbeef", "_rejects/.part-x.parquet.tmp-0badf00d"]


FOREIGN = ["README.txt", "sub/part-0003.parquet", "part-dir/x.parquet", "other.parquet",
           "_rejects/sub/part-0004.parquet", "_rejects/notes.txt", ".hidden", "sub/_summary.json",
           "sub/.part-y.parquet.tmp-12345678"]


def test_prepare_output_returns_own_files_and_deletes_nothing(tmp_path):
    out = tmp_path / "out"
    for rel in OWN + FOREIGN:
        write_bytes(out / rel, b"x")
    found = prepare_output(str(out))
    # Full paths of the pipeline's files only: parts, rejects, everything under _manifest/,
    # the summary, and the hidden temporaries of interrupted local writes (root, _rejects/).
    assert sorted(Path(p).relative_to(out).as_posix() for p in found) == sorted(OWN)
    assert all(Path(p).is_absolute() for p in found)
    # Checking deletes nothing (no probe left either): the run decides what to remove.
    assert files_under(out) == sorted(OWN + FOREIGN)


def test_remove_files_deletes_only_what_it_is_given(tmp_path):
    out = tmp_path / "out"
    for rel in OWN + FOREIGN:
        write_bytes(out / rel, b"x")
    found = prepare_output(str(out))
    doomed = [p for p in found if "_manifest" not in p]
    remove_files(str(out), doomed)
    assert files_under(out) == sorted(FOREIGN + [r for r in OWN if r.startswith("_manifest/")])
    remove_files(str(out), [])  # nothing to do is fine
    remove_files(str(out), prepare_output(str(out)))
    assert files_under(out) == sorted(FOREIGN)
    assert prepare_output(str(out)) == []  # no earlier run left


def test_prepare_output_earlier_run_is_not_refused(tmp_path):
    out = tmp_path / "out"
    write_bytes(out / P1, b"x")
    write_bytes(out / "_summary.json", b"{}")
    found = prepare_output(str(out))  # no --overwrite any more: resume decides later
    assert sorted(Path(p).name for p in found) == ["_summary.json", P1]


@pytest.mark.parametrize("rel", ["part-00000-1a2b-c000.snappy.parquet", "_rejects/part-1.parquet",
                                 "part-0123456789abcdef.parquet"])
def test_part_files_the_pipeline_did_not_write_are_refused_and_kept(tmp_path, rel):
    """Another tool's part files where the output's go: its readers would take them for its
    rows, and deleting them (a resume's stray sweep, --overwrite) would lose someone's data."""
    out = tmp_path / "out"
    write_bytes(out / rel, b"x")
    write_bytes(out / P1, b"x")
    with pytest.raises(OutputError, match=f"holds 1 part file.*did not write \\(e\\.g\\. {rel}\\)"
                                          ".*never deletes them"):
        prepare_output(str(out))
    assert files_under(out) == sorted([rel, P1])


def test_prepare_output_unrelated_files_allowed(tmp_path):
    write_bytes(tmp_path / "out" / "notes.md", b"x")
    prepare_output(str(tmp_path / "out"))
    assert files_under(tmp_path / "out") == ["notes.md"]


@pytest.mark.parametrize("rel", ["", "sub"])
def test_prepare_output_on_or_under_a_regular_file(tmp_path, rel):
    blocker = write_bytes(tmp_path / "file", b"x")
    with pytest.raises(OutputError, match="cannot write"):
        prepare_output(str(blocker / rel) if rel else str(blocker))
    assert blocker.read_bytes() == b"x"


@pytest.mark.parametrize("inp,out", [
    ("/data/in", "/data/in/out"), ("/data/in/", "/data/in/out/"), ("/data/in", "/data/in"),
    ("file:///data/in", "/data/in/x"), ("s3://b/in/", "s3://b/in/out"), ("s3://b/in", "s3://b/in/"),
])
def test_check_disjoint_refuses_output_inside_input(inp, out):
    with pytest.raises(OutputError, match="inside the input"):
        check_disjoint(inp, out)


@pytest.mark.parametrize("inp,out", [
    ("/data/in", "/data/out"), ("/data/in", "/data/input2"), ("/data/in/x", "/data/in"),
    ("s3://b/in", "s3://b/input"), ("s3://b/in", "s3://c/in"),
])
def test_check_disjoint_allows_siblings(inp, out):
    check_disjoint(inp, out)


def test_check_disjoint_relative_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError):
        check_disjoint("data", str(tmp_path / "data" / "out"))


def test_listing_follows_every_page_of_a_prefix_or_glob(s3_endpoint, s3_bucket, monkeypatch):
    """A store lists keys a page at a time (1,000 on S3): a listing of a prefix or a glob over
    more keys than a page must follow every page (3 keys a page here)."""
    from fsspec.asyn import sync

    import pipeline.io.storage as storage
    from tests.s3server import s3_client

    client = s3_client(s3_endpoint)
    for k in range(8):
        client.put_object(Bucket=s3_bucket, Key=f"in/part-{k}.jsonl", Body=b'{"id": 1}\n')
    client.put_object(Bucket=s3_bucket, Key="in/_SUCCESS", Body=b"")
    real, pages = storage.open_filesystem, []

    def small_pages(uri, *args, **kwargs):
        fs, path = real(uri, *args, **kwargs)
        s3 = sync(fs.loop, fs.set_session)

        def page(params, **_):
            params["MaxKeys"] = 3
            pages.append(params.get("Prefix"))

        s3.meta.events.register("before-parameter-build.s3.ListObjectsV2", page)
        return fs, path

    monkeypatch.setattr(storage, "open_filesystem", small_pages)
    options = {"endpoint_url": s3_endpoint}
    for uri in (f"s3://{s3_bucket}/in/", f"s3://{s3_bucket}/in/part-*.jsonl"):
        pages.clear()
        files = storage.list_inputs(uri, options)
        assert [f.uri.rsplit("/", 1)[1] for f in files] == [f"part-{k}.jsonl" for k in range(8)]
        assert len(pages) >= 3  # 9 keys at 3 a page


def test_one_s3_client_per_option_set_and_never_a_stale_listing(s3_endpoint, s3_bucket,
                                                                 monkeypatch):
    """A new S3 filesystem re-parses botocore's S3 model (~0.1-0.25 CPU-s): one per process and
    option set serves every call, while listings always come from the store."""
    import pipeline.io.storage as storage
    from tests.s3server import s3_client

    before = repr((storage.S3_CONFIG, storage.S3_PREFLIGHT_CONFIG))
    options = {"endpoint_url": s3_endpoint}
    fs, path = storage.open_filesystem(f"s3://{s3_bucket}/fresh/", options)
    assert not fs.exists(f"{path.rstrip('/')}/a.jsonl")
    again, _ = storage.open_filesystem(f"s3://{s3_bucket}/other", options)
    assert again is fs, "the same options: the same client"
    # botocore rewrites a config's retries in place: the constants must not change under us.
    assert repr((storage.S3_CONFIG, storage.S3_PREFLIGHT_CONFIG)) == before
    assert storage.open_filesystem(f"s3://{s3_bucket}/x", options, preflight=True)[0] is not fs
    # A key written by someone else is listed at once (no listing cache), and so is a delete.
    client = s3_client(s3_endpoint)
    client.put_object(Bucket=s3_bucket, Key="fresh/a.jsonl", Body=b"{}\n")
    assert fs.ls(path) == [f"{path.rstrip('/')}/a.jsonl"]
    client.delete_object(Bucket=s3_bucket, Key="fresh/a.jsonl")
    assert not fs.exists(f"{path.rstrip('/')}/a.jsonl")
    # Another AWS environment (a rotated key, another endpoint) gets another client.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "rotated")
    assert storage.open_filesystem(f"s3://{s3_bucket}/x", options)[0] is not fs
    # A version in the URI gets a version-aware client, as fsspec's own parsing gives.
    versioned, _ = storage.open_filesystem(f"s3://{s3_bucket}/k?versionId=abc", options)
    assert versioned.version_aware


def test_an_unreadable_local_folder_fails_the_listing_naming_it(tmp_path, monkeypatch):
    # fsspec's walk left such a folder out, and its rows with it. (As root, chmod 000 does not
    # deny a read: the refusal is simulated.)
    import os

    from pipeline.io import storage

    write_bytes(tmp_path / "in" / "a.jsonl", b'{"id": 1, "text": "x"}\n')
    write_bytes(tmp_path / "in" / "locked" / "b.jsonl", b'{"id": 2, "text": "y"}\n')
    real = os.scandir

    def scandir(path):
        if str(path).endswith("/locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(storage.os, "scandir", scandir)
    with pytest.raises(InputError, match=r"cannot list .*/in/locked: permission denied"):
        list_inputs(str(tmp_path / "in"))
