"""Certificates for the TLS tests, made with the ``openssl`` command: a CA, the node, peers, a rogue CA."""

from __future__ import annotations

import subprocess
from pathlib import Path


def _run(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA: (certificate, key)."""
    key, crt = folder / f"{name}.key", folder / f"{name}.crt"
    _run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(crt), "-days", "2",
         "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return crt, key


def make_cert(folder: Path, name: str, ca: tuple[Path, Path], cn: str | None = None) -> tuple[Path, Path]:
    """A leaf certificate signed by ``ca`` for 127.0.0.1 / localhost (server and client use): (cert, key)."""
    key, csr, crt, ext = (folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.crt",
                          folder / f"{name}.ext")
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n"
                   "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n")
    _run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={cn or name}")
    _run("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
         "-out", str(crt), "-days", "2", "-extfile", str(ext))
    key.chmod(0o600)
    return crt, key


def make_all(folder: Path) -> dict[str, tuple[Path, Path]]:
    """``ca``, ``node``, ``pacs`` (CN PACS), ``other`` (CN OTHER, same CA), ``rogue`` (another CA)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = make_ca(folder, "ca")
    rogue_ca = make_ca(folder, "rogue-ca")
    return {"ca": ca, "node": make_cert(folder, "node", ca, "AINODE"), "pacs": make_cert(folder, "pacs", ca, "PACS"),
            "other": make_cert(folder, "other", ca, "OTHER"), "rogue": make_cert(folder, "rogue", rogue_ca, "PACS")}
