"""The keys easgate puts on `flow.metadata`, defined once.

mitmproxy saves metadata with a flow, so these names are also the format of a capture: replay,
mitmweb's annotations and the content view read what the gateway wrote under them.
"""

ROUTE = "easgate.route"  # the route chosen (None: no route, 404 or 400)
UPSTREAM = "easgate.upstream"  # the pool server the request was pointed at
CLIENT_HOST = "easgate.client_host"  # the Host the client addressed (redirect rewriting)
CLIENT_CERT = "easgate.client_cert"  # the client-certificate verdict (status, reason, subject)
REFUSED = "easgate.refused"  # why the connection was refused (TLS policy)
REFUSED_REQUEST = "easgate.refused_request"  # why the strict HTTP reading refused the request
SPOOFED_CERT_HEADER = "easgate.spoofed_cert_header"  # client-sent certificate headers removed
IDENTITY = "easgate.identity"  # the ActiveSync identity the decision was about
DECISION = "easgate.decision"  # the decision (allow, reason, source)
RULE = "easgate.rule"  # the command rule that applied
ANSWER = "easgate.answer"  # how a deny was answered (http, drop, activesync)
RETRY_AFTER = "easgate.retry_after"  # a rate limit's Retry-After
PENDING = "easgate.pending"  # decided on the body, in `request` (ItemOperations)
REWRITTEN = "easgate.rewritten"  # redirect and Autodiscover rewrites done on the response
RECORDED = "easgate.recorded"  # replay: the outcome the capture recorded
REPLAYED = "easgate.replayed"  # replay: the flow was re-decided
