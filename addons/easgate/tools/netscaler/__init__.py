"""`easgate import-netscaler FILE`: turn a NetScaler CLI configuration into an easgate config.

The classic ActiveSync + MDM setup is a handful of NetScaler objects: servers, services and service
groups behind lb vservers (-> pools), a cs vserver with cs policies and actions (-> the listener and
the routes), client certificates from `set ssl vserver` or an ssl profile with the `-CA` bindings,
their OCSP responders and CRLs (-> tls.client_certs), an ssl action with `-certHeader` behind an ssl
policy (-> the routes' `client_cert_header`), and responder policies calling the XNC `httpCallout`
(-> `authorize: activesync`, authorization.connector, its fail mode and deny action).

The lines are read the way NetScaler accepts them, what easgate can express is translated, and
everything else is reported with its line number, weaker-than-the-appliance differences first
(exit status 3). docs/netscaler-import.md has the mapping table.

Modules, in dependency order: lexer (lines, words), expressions (rule trees), filters (rule ->
route match), reasoning (does a condition hold on a route), commands (verbs and options), model,
callouts (XNC parameters), writer (YAML), pools / tls / authorization (parts of the importer),
importer, cli.
"""

from .cli import EXIT_NOT_TRANSLATED, EXIT_OK, EXIT_UNREADABLE, EXIT_WEAKER, add_commands, cmd_import
from .importer import Importer, import_netscaler
from .model import Options, UsageError

__all__ = [
    "EXIT_NOT_TRANSLATED", "EXIT_OK", "EXIT_UNREADABLE", "EXIT_WEAKER", "Importer", "Options", "UsageError",
    "add_commands", "cmd_import", "import_netscaler",
]
