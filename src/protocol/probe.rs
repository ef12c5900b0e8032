//! PROBE properties (§5.13.6.6): the RESV_MEM property, both ways.

use super::*;

/// RESV_MEM subtypes (§5.13.6.6.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ResvKind {
    Reserved = 0,
    Msi = 1,
}

/// A reserved IOVA region reported in a PROBE reply; `end` is inclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResvMem {
    pub kind: ResvKind,
    pub start: u64,
    pub end: u64,
}

/// Writes RESV_MEM properties into `out` (the PROBE reply's properties area) and zero-fills the
/// rest. Fails, writing nothing, when they do not fit (§5.13.6.6.1: status INVAL).
pub fn encode_probe_properties(props: &[ResvMem], out: &mut [u8]) -> Result<(), Status> {
    let needed = props.len() * RESV_MEM_PROPERTY_SIZE;
    if needed > out.len() {
        return Err(Status::Inval);
    }
    out.fill(0);
    for (p, chunk) in props
        .iter()
        .zip(out.chunks_exact_mut(RESV_MEM_PROPERTY_SIZE))
    {
        use vm_memory::ByteValued;
        let w = wire::ResvMemProperty {
            kind: PROBE_T_RESV_MEM.into(),
            length: ((RESV_MEM_PROPERTY_SIZE - 4) as u16).into(),
            subtype: p.kind as u8,
            reserved: [0; 3],
            start: p.start.into(),
            end: p.end.into(),
        };
        chunk.copy_from_slice(w.as_slice());
    }
    Ok(())
}

/// Decodes the RESV_MEM properties of a PROBE reply (the driver's side). Stops at the first zero
/// header (the end of the list); unknown property types are skipped by their length.
pub fn decode_probe_properties(b: &[u8]) -> Result<Vec<ResvMem>, String> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at + 4 <= b.len() {
        let ty = u16::from_le_bytes([b[at], b[at + 1]]) & 0x0fff;
        let len = usize::from(u16::from_le_bytes([b[at + 2], b[at + 3]]));
        if ty == 0 {
            break;
        }
        let body = at + 4;
        if body + len > b.len() {
            return Err(format!("property at {at} overruns the buffer"));
        }
        if ty == PROBE_T_RESV_MEM {
            if len < 20 {
                return Err(format!("RESV_MEM property at {at} has length {len}"));
            }
            let kind = match b[body] {
                0 => ResvKind::Reserved,
                1 => ResvKind::Msi,
                k => return Err(format!("RESV_MEM subtype {k} at {at}")),
            };
            let w: wire::ResvMemProperty = wire::read(&b[at..]);
            out.push(ResvMem {
                kind,
                start: w.start.into(),
                end: w.end.into(),
            });
        }
        at = body + len;
    }
    Ok(out)
}
