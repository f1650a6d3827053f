// njs for mirror_auth's Bearer tokens (mirror_auth.tokens_file), imported
// only when there are token users (cr_proxy/nginx.py, bearer_user): every
// function and literal of an imported module is in the VM nginx clones for
// each request that runs njs, manifest hits included (cr.js), so the
// default configuration carries none of this. Regexes and `require` inside
// the function for the same reason.
const fs = require('fs');

// mirror_auth.tokens_file: who a mirror client's Bearer token names. nginx
// calls this only for a mirror request whose Authorization says Bearer
// (cr_proxy/nginx.py, bearer_user). The file holds `<user>:<sha256 hex>`
// lines, never a token: the token's hash is looked up, so reading the file
// tells no one a token. Read at each call: a changed file counts at once.
// "!" (no identity, refused) for a token no line names, a malformed header,
// or a file that cannot be read. The user names the same grammar as
// config.py's IDENTITY_RE, checked again: the file may have changed since
// serve started.
function bearerUser(r) {
    const found = /^bearer +([A-Za-z0-9._~+\/-]+=*) *$/i.exec(r.variables.http_authorization || '');
    if (!found) {
        return '!';
    }
    const hash = require('crypto').createHash('sha256').update(found[1]).digest('hex');
    let text;
    try {
        text = fs.readFileSync(r.variables.cr_tokens_file, 'utf8');
    } catch (e) {
        return '!';
    }
    // njs 0.7 (Debian 12) has no for...of.
    const lines = text.split('\n');
    for (let i = 0; i < lines.length; i++) {
        const line = /^([A-Za-z0-9._@-]{1,64}):([0-9a-f]{64})$/.exec(lines[i].trim());
        if (line && line[2] === hash) {
            return line[1];
        }
    }
    return '!';
}

export default { bearerUser };
