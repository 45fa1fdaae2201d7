"""Loaded by the moto_server that the tests start (PYTHONPATH points here).

moto's server mode checks SigV4 signatures against werkzeug's `request.url`, which is an IRI:
werkzeug percent-decodes reserved characters of the query ('/', ':', '@', ',', '$', '!', "'",
'(', '*', ';', '?') and non-ASCII bytes before moto re-signs it. Every client that signs the
query as AWS specifies (each of those characters percent-encoded: botocore, the AWS CLI, curl,
qforge) then gets SignatureDoesNotMatch for a ListObjectsV2 whose prefix holds a '/', from
moto only; real S3 and MinIO verify the strict form. This makes `request.url` the URL exactly
as the client sent it (the request line, RAW_URI), so moto verifies what AWS verifies. moto
takes object keys from RAW_URI already, and parses the query with parse_qs (full decoding),
so nothing else changes.
"""
try:
    import werkzeug.sansio.request as _request

    def _url_as_sent(self):
        raw = self.environ.get("RAW_URI") or self.environ.get("REQUEST_URI") if hasattr(
            self, "environ") else None
        if not raw:
            return _request.get_current_url(
                self.scheme, self.host, self.root_path, self.path, self.query_string)
        return f"{self.scheme}://{self.host}{raw}"

    _request.Request.url = property(_url_as_sent)
except ImportError:  # no werkzeug: not a moto process
    pass
