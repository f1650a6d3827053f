// njs for cr-proxy's hit path: headers stored beside cached manifests, and
// tag freshness. Blobs never come here (their headers need no lookup).
// Every name used in a path was checked by nginx's maps (mirror-maps.conf).
const fs = require('fs');

function sidecarPath(r, kind) {
    return `${r.variables.cr_cache}/${kind}/${r.variables.cr_cache_domain}${r.variables.cr_path}`;
}

function readSidecar(r, kind) {
    try {
        return fs.readFileSync(sidecarPath(r, kind), 'utf8').trim();
    } catch (e) {
        return '';
    }
}

function contentType(r) {
    return readSidecar(r, 'content-type');
}

function manifestDigest(r) {
    return readSidecar(r, 'docker-content-digest');
}

// '1' when the manifest may be served from disk: a digest is immutable; a
// tag is fresh for tag_ttl seconds after the upstream last confirmed it
// (the mtime of its docker-content-digest sidecar).
function manifestFresh(r) {
    let st;
    try {
        st = fs.statSync(sidecarPath(r, 'docker-content-digest'));
    } catch (e) {
        return '0';
    }
    if (r.variables.cr_ref.startsWith('sha256:')) {
        return '1';
    }
    const ageMs = Date.now() - st.mtimeMs;
    return ageMs < Number(r.variables.cr_tag_ttl) * 1000 ? '1' : '0';
}

// Everything a manifest hit needs in one call (njs calls cost more than the
// syscalls in them): "1|<content-type>|<digest>" when it may be served from
// disk, "0" otherwise. nginx keeps it with `set` and splits it with maps.
function manifestMeta(r) {
    if (manifestFresh(r) !== '1') {
        return '0';
    }
    return `1|${contentType(r)}|${manifestDigest(r)}`;
}

export default { contentType, manifestDigest, manifestFresh, manifestMeta };
