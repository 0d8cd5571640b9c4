//! Decoding of Kubernetes protobuf request bodies for the few kinds kubectl's typed
//! clients create (`kubectl create secret|configmap|namespace`): Secret, ConfigMap,
//! Namespace. Responses are always JSON (kubectl's Accept header allows it).

use serde_json::{Map, Value, json};

use super::util::{ApiError, ApiResult, base64_encode};

const MAGIC: &[u8] = b"k8s\x00";

enum Wire<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

fn varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut out = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos)?;
        *pos += 1;
        out |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(out);
        }
    }
    None
}

fn fields(buf: &[u8]) -> Option<Vec<(u64, Wire<'_>)>> {
    let mut pos = 0;
    let mut out = Vec::new();
    while pos < buf.len() {
        let tag = varint(buf, &mut pos)?;
        let wire = match tag & 7 {
            0 => Wire::Varint(varint(buf, &mut pos)?),
            1 => {
                pos = pos.checked_add(8).filter(|p| *p <= buf.len())?;
                Wire::Fixed
            }
            2 => {
                let len = usize::try_from(varint(buf, &mut pos)?).ok()?;
                let end = pos.checked_add(len).filter(|e| *e <= buf.len())?;
                let b = &buf[pos..end];
                pos = end;
                Wire::Bytes(b)
            }
            5 => {
                pos = pos.checked_add(4).filter(|p| *p <= buf.len())?;
                Wire::Fixed
            }
            _ => return None,
        };
        out.push((tag >> 3, wire));
    }
    Some(out)
}

fn string(b: &[u8]) -> Option<Value> {
    Some(json!(std::str::from_utf8(b).ok()?))
}

/// A map entry message (key = 1, value = 2), values as strings or base64.
fn map_entry(b: &[u8], base64_values: bool) -> Option<(String, Value)> {
    let mut k = String::new();
    let mut v = json!("");
    for (n, w) in fields(b)? {
        match (n, w) {
            (1, Wire::Bytes(x)) => k = std::str::from_utf8(x).ok()?.to_string(),
            (2, Wire::Bytes(x)) if base64_values => v = json!(base64_encode(x)),
            (2, Wire::Bytes(x)) => v = string(x)?,
            _ => {}
        }
    }
    Some((k, v))
}

fn insert_entry(
    m: &mut Map<String, Value>,
    field: &str,
    b: &[u8],
    base64_values: bool,
) -> Option<()> {
    let (k, v) = map_entry(b, base64_values)?;
    m.entry(field)
        .or_insert_with(|| json!({}))
        .as_object_mut()?
        .insert(k, v);
    Some(())
}

fn owner_reference(b: &[u8]) -> Option<Value> {
    let mut m = Map::new();
    for (n, w) in fields(b)? {
        match (n, w) {
            (1, Wire::Bytes(x)) => _ = m.insert("kind".into(), string(x)?),
            (3, Wire::Bytes(x)) => _ = m.insert("name".into(), string(x)?),
            (4, Wire::Bytes(x)) => _ = m.insert("uid".into(), string(x)?),
            (5, Wire::Bytes(x)) => _ = m.insert("apiVersion".into(), string(x)?),
            (6, Wire::Varint(x)) => _ = m.insert("controller".into(), json!(x != 0)),
            (7, Wire::Varint(x)) => _ = m.insert("blockOwnerDeletion".into(), json!(x != 0)),
            _ => {}
        }
    }
    Some(Value::Object(m))
}

fn object_meta(b: &[u8]) -> Option<Value> {
    let mut m = Map::new();
    for (n, w) in fields(b)? {
        match (n, w) {
            (1, Wire::Bytes(x)) => _ = m.insert("name".into(), string(x)?),
            (2, Wire::Bytes(x)) => _ = m.insert("generateName".into(), string(x)?),
            (3, Wire::Bytes(x)) => _ = m.insert("namespace".into(), string(x)?),
            (6, Wire::Bytes(x)) => _ = m.insert("resourceVersion".into(), string(x)?),
            (11, Wire::Bytes(x)) => insert_entry(&mut m, "labels", x, false)?,
            (12, Wire::Bytes(x)) => insert_entry(&mut m, "annotations", x, false)?,
            (13, Wire::Bytes(x)) => m
                .entry("ownerReferences")
                .or_insert_with(|| json!([]))
                .as_array_mut()?
                .push(owner_reference(x)?),
            (14, Wire::Bytes(x)) => m
                .entry("finalizers")
                .or_insert_with(|| json!([]))
                .as_array_mut()?
                .push(string(x)?),
            _ => {}
        }
    }
    // gogo-protobuf writes empty strings; a JSON client would omit them.
    m.retain(|_, v| v.as_str() != Some(""));
    Some(Value::Object(m))
}

fn decode_kind(kind: &str, raw: &[u8]) -> Option<Value> {
    let mut obj = Map::new();
    obj.insert("kind".into(), json!(kind));
    obj.insert("apiVersion".into(), json!("v1"));
    for (n, w) in fields(raw)? {
        match (kind, n, w) {
            (_, 1, Wire::Bytes(x)) => _ = obj.insert("metadata".into(), object_meta(x)?),
            ("Secret", 2, Wire::Bytes(x)) => insert_entry(&mut obj, "data", x, true)?,
            ("Secret", 3, Wire::Bytes(x)) => _ = obj.insert("type".into(), string(x)?),
            ("Secret", 4, Wire::Bytes(x)) => insert_entry(&mut obj, "stringData", x, false)?,
            ("Secret", 5, Wire::Varint(v)) | ("ConfigMap", 4, Wire::Varint(v)) => {
                _ = obj.insert("immutable".into(), json!(v != 0))
            }
            ("ConfigMap", 2, Wire::Bytes(x)) => insert_entry(&mut obj, "data", x, false)?,
            ("ConfigMap", 3, Wire::Bytes(x)) => insert_entry(&mut obj, "binaryData", x, true)?,
            ("Namespace", 2, Wire::Bytes(x)) => {
                let mut fins = Vec::new();
                for (fnum, fw) in fields(x)? {
                    if let (1, Wire::Bytes(f)) = (fnum, fw) {
                        fins.push(string(f)?);
                    }
                }
                obj.insert("spec".into(), json!({"finalizers": fins}));
            }
            _ => {}
        }
    }
    Some(Value::Object(obj))
}

/// Decodes a `application/vnd.kubernetes.protobuf` body of a Secret, ConfigMap or
/// Namespace into its JSON form.
pub(crate) fn decode(body: &[u8]) -> ApiResult<Value> {
    let unsupported = |why: &str| {
        ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "protobuf request bodies are only supported for Secret, ConfigMap and Namespace ({why}); send application/json"
            ),
        )
    };
    let rest = body
        .strip_prefix(MAGIC)
        .ok_or_else(|| ApiError::bad_request("protobuf body without the k8s envelope"))?;
    let envelope = fields(rest).ok_or_else(|| ApiError::bad_request("malformed protobuf body"))?;
    let mut kind = String::new();
    let mut raw: &[u8] = &[];
    for (n, w) in envelope {
        match (n, w) {
            (1, Wire::Bytes(tm)) => {
                for (tn, tw) in fields(tm)
                    .ok_or_else(|| ApiError::bad_request("malformed protobuf typeMeta"))?
                {
                    if let (2, Wire::Bytes(k)) = (tn, tw) {
                        kind = String::from_utf8_lossy(k).into_owned();
                    }
                }
            }
            (2, Wire::Bytes(r)) => raw = r,
            _ => {}
        }
    }
    if !matches!(kind.as_str(), "Secret" | "ConfigMap" | "Namespace") {
        return Err(unsupported(&format!("got kind {kind:?}")));
    }
    decode_kind(&kind, raw).ok_or_else(|| ApiError::bad_request("malformed protobuf object"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ld(field: u64, b: &[u8]) -> Vec<u8> {
        let mut v = vec![((field << 3) | 2) as u8, b.len() as u8];
        v.extend_from_slice(b);
        v
    }

    #[test]
    fn decodes_a_secret() {
        let meta = [ld(1, b"s"), ld(11, &[ld(1, b"app"), ld(2, b"x")].concat())].concat();
        let secret = [
            ld(1, &meta),
            ld(2, &[ld(1, b"k"), ld(2, b"abc")].concat()),
            ld(3, b"Opaque"),
        ]
        .concat();
        let type_meta = [ld(1, b"v1"), ld(2, b"Secret")].concat();
        let body = [MAGIC.to_vec(), ld(1, &type_meta), ld(2, &secret)].concat();
        let v = decode(&body).unwrap();
        assert_eq!(
            v,
            json!({"kind": "Secret", "apiVersion": "v1", "type": "Opaque",
                   "metadata": {"name": "s", "labels": {"app": "x"}}, "data": {"k": "YWJj"}})
        );
    }
}
