// njs for cr-proxy's hit path: the headers stored beside a cached manifest,
// and tag freshness. Blobs never come here (their headers need no lookup).
// Every name used in a path was checked by nginx's maps (mirror-maps.conf).
// And mirror_auth's Bearer tokens (bearerUser).
const fs = require('fs');
const crypto = require('crypto');

// The stored headers are replayed as they are: the fetcher writes only the
// four manifest types and digests by the grammar, and serve takes anything
// else an older cr-proxy stored off the hit path at start-up
// (cr_proxy/cache/scrub.py). Checking them here, on every hit, cost 12% of
// nginx's instructions per manifest hit.

// Everything a manifest hit needs, in one call (an njs call costs more than
// the syscalls in it): "1|<content-type>|<digest>" when the manifest may be
// served from disk, "0" otherwise; nginx keeps it with `set` and splits it
// with maps. A digest is immutable; a tag is fresh for tag_ttl seconds after
// the upstream last confirmed it (the mtime of its docker-content-digest
// sidecar, which the fetcher touches at each revalidation).
function manifestMeta(r) {
    const v = r.variables;
    const tail = `/${v.cr_cache_domain}${v.cr_path}`;
    const digestFile = `${v.cr_cache}/docker-content-digest${tail}`;
    let st;
    try {
        st = fs.statSync(digestFile);
    } catch (e) {
        return '0';
    }
    if (!v.cr_ref.startsWith('sha256:')
        && Date.now() - st.mtimeMs >= Number(v.cr_tag_ttl) * 1000) {
        return '0';
    }
    try {
        const type = fs.readFileSync(`${v.cr_cache}/content-type${tail}`, 'utf8').trim();
        const digest = fs.readFileSync(digestFile, 'utf8').trim();
        return `1|${type}|${digest}`;
    } catch (e) {
        return '0';  // a sidecar went missing (rm, eviction): the fetcher decides
    }
}

// mirror_auth.tokens_file: who a mirror client's Bearer token names. nginx
// calls this only for a mirror request whose Authorization says Bearer
// (cr_proxy/nginx.py, bearer_user). The file holds `<user>:<sha256 hex>`
// lines, never a token: the token's hash is looked up, so reading the file
// tells no one a token. Read at each call: a changed file counts at once.
// "!" (no identity, refused) for a token no line names, a malformed header,
// or a file that cannot be read. The user names the same grammar as
// config.py's IDENTITY_RE, checked again: the file may have changed since
// serve started.
const BEARER = /^bearer +([A-Za-z0-9._~+\/-]+=*) *$/i;
const TOKEN_LINE = /^([A-Za-z0-9._@-]{1,64}):([0-9a-f]{64})$/;

function bearerUser(r) {
    const found = BEARER.exec(r.variables.http_authorization || '');
    if (!found) {
        return '!';
    }
    const hash = crypto.createHash('sha256').update(found[1]).digest('hex');
    let text;
    try {
        text = fs.readFileSync(r.variables.cr_tokens_file, 'utf8');
    } catch (e) {
        return '!';
    }
    // njs 0.7 (Debian 12) has no for...of.
    const lines = text.split('\n');
    for (let i = 0; i < lines.length; i++) {
        const line = TOKEN_LINE.exec(lines[i].trim());
        if (line && line[2] === hash) {
            return line[1];
        }
    }
    return '!';
}

export default { manifestMeta, bearerUser };
