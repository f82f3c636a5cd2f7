"""`voiceassist audit ...`: export the ledger (the retention path), verify it on the server, and watch it from the
outside like a transparency-log monitor (signed checkpoints and consistency proofs, checked locally)."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import click
import grpc
from google.protobuf.json_format import MessageToDict

from services.audit import ledger_proofs
from services.core.cli_login import SignIn, sign_in_options
from voiceassist.audit.v1 import audit_pb2, audit_pb2_grpc


def _stub(sign_in: SignIn) -> tuple[grpc.Channel, audit_pb2_grpc.AuditServiceStub]:
    channel = sign_in.channel()
    return channel, audit_pb2_grpc.AuditServiceStub(channel)


def _fail(error: grpc.RpcError) -> click.ClickException:
    return click.ClickException(f"{error.code().name}: {error.details()}")


@click.group()
def audit() -> None:
    """The audit ledger: export, verify, monitor."""


@audit.command("export")
@sign_in_options
@click.option("--after", "after_sequence", type=int, default=0, help="Resume after this sequence number.")
@click.option("--action-prefix", default="", help="Only actions starting with this, e.g. auth.login.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), help="File to append to (default: stdout).")
def export_command(sign_in: SignIn, after_sequence: int, action_prefix: str, output: Path | None):
    """Write events as newline-delimited JSON, oldest first (a user's own events; an admin's: all). Events are never
    deleted from the ledger; keep the exports (HIPAA: 6 years) and resume an interrupted one with --after."""
    metadata = sign_in.metadata()
    channel, stub = _stub(sign_in)
    request = audit_pb2.ExportEventsRequest(
        filter=audit_pb2.EventFilter(action_prefix=action_prefix), after_sequence=after_sequence
    )
    last = after_sequence
    with channel, output.open("a") if output else contextlib.nullcontext(sys.stdout) as out:
        try:
            for reply in stub.ExportEvents(request, metadata=metadata):
                if reply.HasField("error"):
                    break  # the call's status says it too, below
                out.write(json.dumps(MessageToDict(reply.event), separators=(",", ":")) + "\n")
                last = reply.event.sequence
        except grpc.RpcError as error:
            raise click.ClickException(f"{error.code().name}: {error.details()} (resume with --after {last})") from None
    click.echo(f"exported up to sequence {last}", err=True)


@audit.command("verify")
@sign_in_options
@click.option("--start", type=int, default=0, help="First sequence number (default: the first event).")
@click.option("--end", type=int, default=0, help="Last sequence number (default: the newest event).")
def verify_command(sign_in: SignIn, start: int, end: int) -> None:
    """Have the server recompute the chain and the tree (VerifyIntegrity, admins only); exit 1 on the first
    inconsistency."""
    metadata = sign_in.metadata()
    channel, stub = _stub(sign_in)
    with channel:
        try:
            report = stub.VerifyIntegrity(
                audit_pb2.VerifyIntegrityRequest(start_sequence=start, end_sequence=end),
                metadata=metadata,
                timeout=600,
            )
        except grpc.RpcError as error:
            raise _fail(error) from None
    click.echo(json.dumps(MessageToDict(report, always_print_fields_with_no_presence=True), indent=2))
    if not report.ok:
        sys.exit(1)


@audit.command("monitor")
@sign_in_options
@click.option("--state", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where the last verified checkpoint and the pinned public key are kept.")  # fmt: skip
def monitor_command(sign_in: SignIn, state: Path) -> None:
    """Fetch the newest signed checkpoint and prove, with checks run here, that it extends the one seen last
    time (any account may). The first run pins the public key; later runs refuse any other key."""
    metadata = sign_in.metadata()
    channel, stub = _stub(sign_in)
    saved = json.loads(state.read_text()) if state.exists() else None
    with channel:
        try:
            reply = stub.GetCheckpoint(audit_pb2.GetCheckpointRequest(), metadata=metadata, timeout=30)
            public_key = bytes.fromhex(saved["public_key"]) if saved else reply.public_key
            if not ledger_proofs.verify_checkpoint_message(reply.checkpoint, public_key):
                raise click.ClickException("the checkpoint's signature does not verify with the pinned key")
            new = reply.checkpoint
            if saved and saved["tree_size"] > 0:
                old_size, old_root = saved["tree_size"], bytes.fromhex(saved["root_hash"])
                proof = stub.GetConsistencyProof(
                    audit_pb2.GetConsistencyProofRequest(old_size=old_size, new_size=new.tree_size),
                    metadata=metadata,
                    timeout=30,
                )
                if not ledger_proofs.verify_consistency(
                    old_size, new.tree_size, old_root, new.root_hash, list(proof.hashes)
                ):
                    raise click.ClickException(f"the ledger was rewritten: size {new.tree_size} does not extend "
                                               f"the checkpoint of size {old_size} seen before")  # fmt: skip
        except grpc.RpcError as error:
            raise _fail(error) from None
    state.write_text(
        json.dumps({"tree_size": new.tree_size, "root_hash": new.root_hash.hex(), "public_key": public_key.hex()})
    )
    click.echo(f"ok: tree size {new.tree_size}, root {new.root_hash.hex()}")
