// njs for cr-proxy's hit path: the headers stored beside a cached manifest,
// and tag freshness. Blobs never come here (their headers need no lookup).
// Every name used in a path was checked by nginx's maps (mirror-maps.conf).
const fs = require('fs');

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

export default { manifestMeta };
