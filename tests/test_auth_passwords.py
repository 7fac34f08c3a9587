"""Password hashes and files (mqtt_broker.auth.passwords) and the mqttbroker-passwd command
(mqtt_broker.passwd), checked both ways against the real mosquitto_passwd and mosquitto."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from auth_helpers import Mosquitto, RawClient
from conftest import ROOT

from mqtt_broker.auth.passwords import (DEFAULT_ITERATIONS, PBKDF2, SHA512, PasswordFile, PasswordFileError,
                                        PasswordHash)
from mqtt_broker.passwd import main
from mqtt_broker.wire.packets import MQTT_3_1_1, MQTT_5

MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
WAIT = 30


def mosquitto_passwd(*args: str | Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([MOSQUITTO_PASSWD, *map(str, args)], capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 0, result.stderr
    return result


def ours(*args: str | Path) -> int:
    return main([str(a) for a in args])


# --- hashes -----------------------------------------------------------------------------------

def test_pbkdf2_hash_is_what_mosquitto_computes() -> None:
    salt = bytes(range(12))
    hashed = PasswordHash.create(b"secret", PBKDF2, 101, salt)
    assert hashed.digest == hashlib.pbkdf2_hmac("sha512", b"secret", salt, 101, 64)
    assert str(hashed) == "$7$101$" + base64.b64encode(salt).decode() + "$" + base64.b64encode(hashed.digest).decode()
    assert PasswordHash.parse(str(hashed)) == hashed


def test_sha512_hash_is_password_then_salt() -> None:
    salt = b"saltsaltsalt"
    hashed = PasswordHash.create(b"secret", SHA512, salt=salt)
    assert hashed.digest == hashlib.sha512(b"secret" + salt).digest()
    assert str(hashed).startswith("$6$") and hashed.iterations == 0
    assert PasswordHash.parse(str(hashed)) == hashed


@pytest.mark.parametrize("algorithm", [PBKDF2, SHA512])
def test_verify(algorithm: str) -> None:
    hashed = PasswordHash.create(b"right", algorithm)
    assert hashed.verify(b"right")
    for wrong in (b"wrong", b"", b"right ", b"Right", b"right\x00", b"\xff" * 70000):
        assert not hashed.verify(wrong)


def test_each_hash_has_its_own_salt() -> None:
    assert PasswordHash.create(b"same").salt != PasswordHash.create(b"same").salt


def test_digest_is_not_in_repr() -> None:
    assert base64.b64encode(PasswordHash.create(b"x").digest).decode() not in repr(PasswordHash.create(b"x"))


@pytest.mark.parametrize("text", [
    "", "secret", "$5$abc$def", "$7$$AAAAAAAAAAAAAAAA$" + "A" * 88, "$7$x$AAAAAAAAAAAAAAAA$" + "A" * 88,
    "$7$0$AAAAAAAAAAAAAAAA$" + "A" * 86 + "==", "$7$101$AAAA$" + "A" * 86 + "==",
    "$7$101$AAAAAAAAAAAAAAAA$AAAA", "$6$AAAAAAAAAAAAAAAA$!!!!", "$6$AAAAAAAAAAAAAAAA",
    "$7$101$AAAAAAAAAAAAAAAA$" + "A" * 86 + "==$extra", "$7$99999999999$AAAAAAAAAAAAAAAA$" + "A" * 86 + "==",
])
def test_bad_hashes_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        PasswordHash.parse(text)


# --- files ------------------------------------------------------------------------------------

def test_file_parse_skips_comments_and_blank_lines() -> None:
    alice, bob = PasswordHash.create(b"a"), PasswordHash.create(b"b", SHA512)
    text = f"# users\n\nalice:{alice}\n  # indented comment\n bob : {bob} \r\n"
    parsed = PasswordFile.parse(text)
    assert parsed.users == {"alice": alice, "bob": bob}
    assert PasswordFile.parse(parsed.dump()).users == parsed.users


@pytest.mark.parametrize("text,problem", [
    ("alice\n", "line 1: expected username:hash"),
    (":$6$x$y\n", "line 1: expected username:hash"),
    ("alice:plaintext\n", "line 1: user 'alice': not a $6$ or $7$ hash"),
])
def test_bad_file_names_the_line(text: str, problem: str) -> None:
    with pytest.raises(PasswordFileError) as caught:
        PasswordFile.parse(text.format(h=PasswordHash.create(b"x")), "pw")
    assert str(caught.value) == "pw, " + problem


def test_a_user_listed_twice_has_the_password_of_their_last_line_as_in_mosquitto(tmp_path: Path) -> None:
    """Mosquitto 2.0.11 starts with such a file and takes the user's last line (alice "one"
    refused, "uno" let in); the file was refused here, and the broker did not start."""
    path = tmp_path / "pw"
    mosquitto_passwd("-c", "-b", path, "alice", "one")
    first = path.read_text()
    mosquitto_passwd("-c", "-b", path, "alice", "uno")
    path.write_text(f"{first}# again\n{path.read_text()}")
    parsed = PasswordFile.load(path)
    assert parsed.users["alice"].verify(b"uno") and not parsed.users["alice"].verify(b"one")
    assert parsed.repeated == (f"{path}, line 3: user 'alice' given again: its line 1 is not used (the last line "
                               f"counts, as in Mosquitto)",)


def test_the_broker_warns_of_a_user_listed_twice(tmp_path: Path) -> None:
    from auth_helpers import LogCapture

    from mqtt_broker.auth.authenticators import PasswordFileAuthenticator
    path = tmp_path / "pw"
    path.write_text(f"alice:{PasswordHash.create(b'one')}\nalice:{PasswordHash.create(b'uno')}\n")
    with LogCapture() as log:
        PasswordFileAuthenticator(str(path))
    assert f"{path}, line 2: user 'alice' given again: its line 1 is not used" in log.text()


def test_bad_file_error_never_repeats_a_plain_password() -> None:
    with pytest.raises(PasswordFileError) as caught:
        PasswordFile.parse("alice:hunter2-plain\n")
    assert "hunter2" not in str(caught.value)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(PasswordFileError, match="cannot read: No such file"):
        PasswordFile.load(tmp_path / "absent")
    (tmp_path / "latin1").write_bytes(b"\xe9l\xe8ve:$6$x$y\n")
    with pytest.raises(PasswordFileError, match="not UTF-8"):
        PasswordFile.load(tmp_path / "latin1")


# --- against mosquitto_passwd ------------------------------------------------------------------

@pytest.mark.parametrize("options", [[], ["-H", "sha512"], ["-H", "sha512-pbkdf2"], ["-I", "7"]])
def test_files_mosquitto_passwd_writes_verify_here(tmp_path: Path, options: list[str]) -> None:
    path = tmp_path / "pw"
    mosquitto_passwd(*options, "-c", "-b", path, "alice", "correct horse")
    mosquitto_passwd(*options, "-b", path, "b+o#b/%", "pässwörd ✓")
    users = PasswordFile.load(path).users
    assert users["alice"].verify(b"correct horse") and not users["alice"].verify(b"correct horsE")
    assert users["b+o#b/%"].verify("pässwörd ✓".encode()) and not users["b+o#b/%"].verify(b"")
    if options == ["-H", "sha512"]:
        assert users["alice"].algorithm == SHA512
    else:
        assert users["alice"].algorithm == PBKDF2
        assert users["alice"].iterations == (7 if options == ["-I", "7"] else DEFAULT_ITERATIONS)


def test_mosquitto_passwd_updates_files_we_write(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    assert ours("-c", "-b", path, "alice", "a-pass") == 0
    mosquitto_passwd("-b", path, "bob", "b-pass")
    mosquitto_passwd("-D", path, "alice")
    users = PasswordFile.load(path).users
    assert list(users) == ["bob"] and users["bob"].verify(b"b-pass")


@pytest.mark.parametrize("options", [[], ["-H", "sha512"], ["-I", "20000"]])
def test_files_we_write_work_in_mosquitto(tmp_path: Path, options: list[str]) -> None:
    path = tmp_path / "pw"
    assert ours(*options, "-c", "-b", path, "alice", "correct horse") == 0
    assert ours(*options, "-b", path, "bob", "pässwörd") == 0
    if options == ["-I", "20000"]:
        assert "$7$20000$" in path.read_text()
    mosquitto = Mosquitto(tmp_path, password_file=str(path), allow_anonymous="false")
    try:
        for version in (MQTT_3_1_1, MQTT_5):
            def code(username: str | None, password: bytes | None) -> int:
                client = RawClient(mosquitto.port, "probe", username, password, version)
                client.close()
                return client.connack.reason_code

            assert code("alice", b"correct horse") == 0
            assert code("bob", "pässwörd".encode()) == 0
            refused = 5 if version == MQTT_3_1_1 else 0x87  # Mosquitto says "not authorized"
            assert code("alice", b"correct horsE") == refused
            assert code("bob", b"passwort") == refused
            assert code("carol", b"correct horse") == refused
            assert code(None, None) == refused
        # and with Mosquitto's own client
        run = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(mosquitto.port), "-u", "alice",
                              "-P", "correct horse", "-t", "t", "-m", "m"], capture_output=True, timeout=WAIT)
        assert run.returncode == 0, run.stderr
        run = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(mosquitto.port), "-u", "alice",
                              "-P", "wrong", "-t", "t", "-m", "m"], capture_output=True, timeout=WAIT)
        assert run.returncode != 0
    finally:
        mosquitto.stop()


# --- the command --------------------------------------------------------------------------------

def test_create_update_delete(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    assert ours("-c", "-b", path, "alice", "one") == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ours("-b", path, "bob", "two") == 0
    assert ours("-b", "-H", "sha512", path, "alice", "three") == 0
    users = PasswordFile.load(path).users
    assert list(users) == ["alice", "bob"]
    assert users["alice"].algorithm == SHA512 and users["alice"].verify(b"three")
    assert users["bob"].verify(b"two")
    assert ours("-D", path, "alice") == 0
    assert list(PasswordFile.load(path).users) == ["bob"]
    assert ours("-c", "-b", path, "carol", "four") == 0
    assert list(PasswordFile.load(path).users) == ["carol"]


def test_update_keeps_other_lines_and_the_mode(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    bob = PasswordHash.create(b"two")
    path.write_text(f"# managed by hand\nalice:{PasswordHash.create(b'one')}\n\nbob:{bob}\n")
    path.chmod(0o640)
    assert ours("-b", path, "alice", "new") == 0
    lines = path.read_text().splitlines()
    assert lines[0] == "# managed by hand" and lines[2] == "" and lines[3] == f"bob:{bob}"
    assert PasswordFile.load(path).users["alice"].verify(b"new")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["pw"]  # no temporary file left behind


def test_update_and_delete_take_every_line_of_a_user_listed_twice_as_mosquitto_passwd(tmp_path: Path) -> None:
    """mosquitto_passwd 2.0.11 gives each of the user's lines the new password, and -D removes
    them all: changing only the first would leave the last, the one read, as it was."""
    path = tmp_path / "pw"
    bob = PasswordHash.create(b"two")
    path.write_text(f"alice:{PasswordHash.create(b'one')}\nbob:{bob}\nalice:{PasswordHash.create(b'uno')}\n")
    assert ours("-b", path, "alice", "new") == 0
    lines = path.read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["alice", "bob", "alice"] and lines[1] == f"bob:{bob}"
    assert all(PasswordHash.parse(line.split(":", 1)[1]).verify(b"new") for line in lines[::2])
    assert ours("-D", path, "alice") == 0
    assert path.read_text() == f"bob:{bob}\n"


def test_update_keeps_the_owner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A broker that runs as its own user (Mosquitto's packaging: mosquitto, 0600) must still read
    the file once root has changed a password in it."""
    path = tmp_path / "pw"
    assert ours("-c", "-b", path, "alice", "one") == 0
    path.chmod(0o600)
    if os.geteuid() == 0:
        os.chown(path, 4321, 4322)
    else:  # only root gives a file another owner: here it is we who look like another user
        monkeypatch.setattr(os, "geteuid", lambda: path.stat().st_uid + 1)
    owner = (path.stat().st_uid, path.stat().st_gid)
    given = []
    fchown = os.fchown
    monkeypatch.setattr(os, "fchown", lambda fd, uid, gid: (given.append((uid, gid)), fchown(fd, uid, gid)))
    assert ours("-b", path, "bob", "two") == 0
    assert given == [owner]
    assert (path.stat().st_uid, path.stat().st_gid, stat.S_IMODE(path.stat().st_mode)) == (*owner, 0o600)
    assert list(PasswordFile.load(path).users) == ["alice", "bob"]


def test_iterations(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    assert ours("-c", "-b", "-I", "1234", path, "alice", "x") == 0
    assert PasswordFile.load(path).users["alice"].iterations == 1234
    assert ours("-b", "-I", "0", path, "alice", "x") == 1


def test_upgrade_plain_text_file(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    kept = PasswordHash.create(b"already")
    path.write_text(f"# comment\nalice:plain one\nbob:{kept}\n")
    assert ours("-U", path) == 0
    users = PasswordFile.load(path).users
    assert users["alice"].verify(b"plain one") and users["bob"] == kept
    assert path.read_text().startswith("# comment\n")


@pytest.mark.parametrize("options, algorithm, iterations", [(["-H", "sha512"], SHA512, 0), (["-I", "2345"], PBKDF2, 2345)])
def test_upgrade_hashes_as_its_options_say(tmp_path: Path, options: list[str], algorithm: str, iterations: int) -> None:
    """-U hashed with 101 PBKDF2 iterations whatever -H or -I said (mosquitto_passwd -H sha512 -U
    writes $6$ lines)."""
    path = tmp_path / "pw"
    path.write_text("alice:plain one\n")
    assert ours(*options, "-U", path) == 0
    hashed = PasswordFile.load(path).users["alice"]
    assert (hashed.algorithm, hashed.iterations) == (algorithm, iterations) and hashed.verify(b"plain one")
    path.write_text("alice:plain one\n")
    assert ours("-I", "0", "-U", path) == 1 and path.read_text() == "alice:plain one\n"


def test_non_utf8_password_bytes_are_hashed_as_given(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    password = os.fsdecode(b"caf\xe9")  # what argv holds for bytes that are not UTF-8
    assert ours("-c", "-b", path, "alice", password) == 0
    assert PasswordFile.load(path).users["alice"].verify(b"caf\xe9")


@pytest.mark.parametrize("args,message", [
    (["-b", "{path}", "a:b", "x"], "must not be empty, contain ':'"),
    (["-b", "{path}", "", "x"], "must not be empty"),
    (["-b", "{path}", " alice", "x"], "start or end with a space"),
    (["-D", "{path}", "nobody"], "user nobody not found"),
    (["-b", "{missing}", "alice", "x"], "unable to open password file"),
    (["-b", "{path}", "alice"], "-b needs the password"),
    (["{path}", "alice", "x"], "only with -b"),
    (["-D", "-b", "{path}", "alice", "x"], "-D takes no password"),
    (["{path}"], "a username is required"),
    (["-U", "{path}", "alice"], "-U takes only the password file"),
])
def test_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    path = tmp_path / "pw"
    ours("-c", "-b", path, "alice", "x")
    before = path.read_bytes()
    filled = [a.format(path=path, missing=tmp_path / "missing") for a in args]
    assert main(filled) == 1
    assert message in capsys.readouterr().err
    assert path.read_bytes() == before


@pytest.mark.parametrize("where", ["missing/pw", "directory"])
def test_a_file_that_cannot_be_written_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str) -> None:
    """The error named the temporary file written beside it (".pw.ug7zgu2q: No such file or
    directory", or ".directory.x1b2: Is a directory"), a name the user never gave."""
    (tmp_path / "directory").mkdir()
    path = tmp_path / where
    assert main(["-c", "-b", str(path), "alice", "x"]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"Error: unable to write password file {path}: "), error
    assert [p.name for p in tmp_path.iterdir()] == ["directory"] and not any((tmp_path / "directory").iterdir())


def test_a_password_piped_in_twice_is_taken_as_mosquitto_passwd_takes_it(tmp_path: Path) -> None:
    """Scripts pipe it to keep it off the command line; it was refused without a terminal."""
    import io

    from mqtt_broker.passwd import CommandError, run
    path = tmp_path / "pw"
    run(["-c", str(path), "alice"], stdin=io.StringIO("s3cret\ns3cret\n"))
    run([str(path), "bob"], stdin=io.StringIO("\n\n"))  # an empty password, as with -b
    users = PasswordFile.load(path).users
    assert users["alice"].verify(b"s3cret") and users["bob"].verify(b"")
    with pytest.raises(CommandError, match="do not match"):
        run([str(path), "carol"], stdin=io.StringIO("one\ntwo\n"))
    with pytest.raises(CommandError, match="no password on standard input"):
        run([str(path), "carol"], stdin=io.StringIO("once\n"))
    theirs = tmp_path / "theirs"
    done = subprocess.run(["mosquitto_passwd", "-c", str(theirs), "alice"], input=b"s3cret\ns3cret\n",
                          capture_output=True, timeout=30)
    assert done.returncode == 0 and PasswordFile.load(theirs).users["alice"].verify(b"s3cret")


def test_a_symlinked_password_file_is_updated_through_the_link(tmp_path: Path) -> None:
    """As mosquitto_passwd does (a secret mounted by Kubernetes, a file of a configuration
    manager): the link was replaced by a file, and the file it named kept the old users."""
    target, link = tmp_path / "real", tmp_path / "link"
    assert ours("-c", "-b", target, "alice", "a") == 0
    link.symlink_to(target)
    assert ours("-b", link, "bob", "b") == 0
    assert link.is_symlink() and sorted(PasswordFile.load(target).users) == ["alice", "bob"]


def test_a_username_that_is_not_utf8_is_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The broker reads the file as UTF-8; such a name ended the command in a traceback."""
    assert main(["-c", "-b", str(tmp_path / "pw"), os.fsdecode(b"\xff"), "x"]) == 1
    assert "must be UTF-8" in capsys.readouterr().err and not (tmp_path / "pw").exists()


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["-c", "-D", str(tmp_path / "pw"), "alice"])
    assert caught.value.code == 2
    with pytest.raises(SystemExit) as caught:
        main(["-H", "md5", "-b", str(tmp_path / "pw"), "alice", "x"])
    assert caught.value.code == 2


def test_refuses_to_update_a_broken_file(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    path.write_text("alice:not-a-hash\n")
    assert main(["-b", str(path), "bob", "x"]) == 1
    assert path.read_text() == "alice:not-a-hash\n"


def test_python_dash_m(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    result = subprocess.run([sys.executable, "-m", "mqtt_broker.passwd", "-c", "-b", str(path), "alice", "pw"],
                            cwd=ROOT, capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 0, result.stderr
    assert PasswordFile.load(path).users["alice"].verify(b"pw")
    result = subprocess.run([sys.executable, "-m", "mqtt_broker.passwd", "-D", str(path), "bob"],
                            cwd=ROOT, capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 1 and "Error: user bob not found" in result.stderr


def test_iterations_beyond_what_mosquitto_reads_are_an_error_not_a_traceback(tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-c", "-b", "-I", str(2**31), str(tmp_path / "pw"), "alice", "pw"]) == 1
    assert "iterations must be 1 to 2147483647" in capsys.readouterr().err
    assert not (tmp_path / "pw").exists()


def test_upgrade_leaves_alone_a_file_the_broker_would_refuse(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """-U hashed ":secret" into a line the broker refuses, and with it the whole file: at start
    and on reload, every user locked out. It says so and writes nothing."""
    path = tmp_path / "pw"
    path.write_text("alice:secret\n:secret\n")
    assert main(["-U", str(path)]) == 1
    assert "line 2" in capsys.readouterr().err
    assert path.read_text() == "alice:secret\n:secret\n"


def test_passwd_never_writes_a_user_the_broker_reads_as_a_comment(tmp_path: Path) -> None:
    """mqttbroker-passwd takes a username starting with "#" and writes "#admin:$7$...": a line the
    broker (as Mosquitto) skips as a comment. The user can never log in, adding it again appends
    a second line, and -D does not find it. The tool should refuse such a username (exit 1), as
    it refuses ':' and surrounding spaces, since the broker could never use it."""
    path = tmp_path / "pw"
    assert main(["-c", "-b", str(path), "#admin", "pw"]) == 1
    assert not path.exists()


def test_passwd_updates_a_file_whose_comment_is_not_utf8_as_the_broker_reads_it(tmp_path: Path) -> None:
    """docs/mosquitto.md: a comment line that is not UTF-8 (Latin-1, say) in the password file is
    read, as Mosquitto reads bytes; PasswordFile.load accepts such a file. mqttbroker-passwd
    refuses to add a user to it ("is not UTF-8"), though its own rule is to refuse only a file
    the broker could not read, and to keep other lines as they are."""
    path = tmp_path / "pw"
    path.write_bytes(b"# Gr\xfc\xdfe von M\xfcller\n")
    assert list(PasswordFile.load(path).users) == []  # the broker reads it
    assert main(["-b", str(path), "bob", "pw"]) == 0
    assert path.read_bytes().startswith(b"# Gr\xfc\xdfe von M\xfcller\n")
    assert PasswordFile.load(path).users["bob"].verify(b"pw")
