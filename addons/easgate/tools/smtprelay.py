"""SMTP in, LMTP out: how mail that the real ActiveSync stack's SOGo sends reaches Dovecot mailboxes.

SOGo only speaks SMTP; Dovecot delivers over LMTP. This relay answers SOGo's DATA only after Dovecot
accepted the message for every recipient, so when a SendMail succeeds the mail is already in the
recipient's IMAP mailbox (no queue, no polling). A refused recipient is refused back to SOGo.
aiosmtpd is the maintained successor of the stdlib `smtpd` module (gone in Python 3.12); postfix would
do the same job with a spool, a queue manager and a dozen files of configuration to keep in a temp dir.

Run: python -m easgate.tools.smtprelay HOST PORT LMTP_SOCKET
"""

from __future__ import annotations

import asyncio
import signal
import smtplib
import sys

from aiosmtpd.controller import Controller


class LmtpRelay:
    """aiosmtpd handler: deliver each accepted message to Dovecot's LMTP socket, synchronously."""

    def __init__(self, lmtp_socket: str) -> None:
        self.lmtp_socket = lmtp_socket

    async def handle_DATA(self, server, session, envelope) -> str:
        return await asyncio.get_running_loop().run_in_executor(None, self._deliver, envelope)

    def _deliver(self, envelope) -> str:
        try:
            with smtplib.LMTP(self.lmtp_socket, timeout=30) as lmtp:
                refused = lmtp.sendmail(envelope.mail_from, envelope.rcpt_tos, envelope.original_content)
        except smtplib.SMTPRecipientsRefused as e:
            return f"550 no recipient accepted: {', '.join(e.recipients)}"
        except (OSError, smtplib.SMTPException) as e:
            return f"451 delivery failed: {e}"
        if refused:
            return f"550 refused: {', '.join(refused)}"
        return "250 delivered"


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m easgate.tools.smtprelay HOST PORT LMTP_SOCKET", file=sys.stderr)
        return 2
    host, port, sock = argv[0], int(argv[1]), argv[2]
    c = Controller(LmtpRelay(sock), hostname=host, port=port, server_hostname="relay.example.test")
    c.start()
    print(f"relaying SMTP {host}:{port} to LMTP {sock}", flush=True)
    stop = asyncio.Event()

    async def wait() -> None:
        loop = asyncio.get_running_loop()
        for s in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(s, stop.set)
        await stop.wait()

    asyncio.run(wait())
    c.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
