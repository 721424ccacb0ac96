/// Why a packet was rejected. Each variant maps to one drop counter in the daemons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("packet truncated: need {needed} bytes, have {have}")]
    Truncated { needed: usize, have: usize },
    #[error("unsupported PON version {0}")]
    BadVersion(u8),
    #[error("unknown PON packet kind {0}")]
    BadKind(u8),
    #[error("hop count {0} outside 1..={max}", max = crate::pon::MAX_HOPS)]
    BadHopCount(u8),
    #[error("hop index {index} out of range for {count} hops")]
    HopIndexOutOfRange { index: u8, count: u8 },
    #[error("inner packet is not IPv4 or IPv6 (version nibble {0})")]
    NotIp(u8),
    #[error("IPv4 header length field {0} is invalid")]
    BadHeaderLength(u8),
    #[error("IP total length {total} disagrees with the {have} bytes received")]
    BadTotalLength { total: usize, have: usize },
    #[error("outer packet carries IP protocol {0}, not IP-in-IP (4)")]
    NotIpInIp(u8),
    #[error("IPv4 header checksum mismatch")]
    BadChecksum,
    #[error("buffer too small to emit: need {needed} bytes, have {have}")]
    BufferTooSmall { needed: usize, have: usize },
    #[error("probe train index {index} not below train length {len}")]
    BadTrain { index: u16, len: u16 },
}

impl Error {
    /// A short stable label for metrics (`reason="..."`).
    pub fn label(&self) -> &'static str {
        match self {
            Error::Truncated { .. } => "truncated",
            Error::BadVersion(_) => "bad_version",
            Error::BadKind(_) => "bad_kind",
            Error::BadHopCount(_) => "bad_hop_count",
            Error::HopIndexOutOfRange { .. } => "hop_index_out_of_range",
            Error::NotIp(_) => "inner_not_ip",
            Error::BadHeaderLength(_) => "bad_header_length",
            Error::BadTotalLength { .. } => "bad_total_length",
            Error::NotIpInIp(_) => "not_ipip",
            Error::BadChecksum => "bad_checksum",
            Error::BufferTooSmall { .. } => "buffer_too_small",
            Error::BadTrain { .. } => "bad_train",
        }
    }
}

pub(crate) fn need(have: usize, needed: usize) -> crate::Result<()> {
    if have < needed {
        Err(Error::Truncated { needed, have })
    } else {
        Ok(())
    }
}
