/// Why a packet was rejected. Each variant maps to one drop counter in the
/// daemons, labelled with [`Error::label`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("packet truncated: need {needed} bytes, have {have}")]
    Truncated { needed: usize, have: usize },
    #[error("unsupported PON version {0}")]
    BadVersion(u8),
    #[error("unknown PON packet kind {0}")]
    UnknownKind(u8),
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
    #[error(
        "IPv4 fragment (offset {offset}, more fragments {more}) where a whole packet is required"
    )]
    Fragment { offset: u16, more: bool },
    #[error("outer packet carries IP protocol {0}, not IP-in-IP (4)")]
    NotIpInIp(u8),
    #[error("IPv4 header checksum mismatch")]
    BadChecksum,
    #[error("buffer too small to emit: need {needed} bytes, have {have}")]
    BufferTooSmall { needed: usize, have: usize },
    #[error("probe train index {index} not below train length {len}")]
    BadTrain { index: u16, len: u16 },
    #[error("{extra} bytes after the end of a fixed-size message")]
    TrailingBytes { extra: usize },
}

impl Error {
    /// How many variants there are: the size of a per-reason counter array.
    pub const COUNT: usize = Error::LABELS.len();

    /// Every label, in [`Error::index`] order, so that a daemon can declare
    /// one counter per reason before any packet arrives.
    pub const LABELS: [&'static str; 14] = [
        "truncated",
        "bad_version",
        "unknown_kind",
        "bad_hop_count",
        "hop_index_out_of_range",
        "inner_not_ip",
        "bad_header_length",
        "bad_total_length",
        "fragment",
        "not_ipip",
        "bad_checksum",
        "buffer_too_small",
        "bad_train",
        "trailing_bytes",
    ];

    /// A dense index below [`Error::COUNT`], for counter arrays: a drop is
    /// counted by indexing, with no allocation or string work per packet.
    pub const fn index(&self) -> usize {
        match self {
            Error::Truncated { .. } => 0,
            Error::BadVersion(_) => 1,
            Error::UnknownKind(_) => 2,
            Error::BadHopCount(_) => 3,
            Error::HopIndexOutOfRange { .. } => 4,
            Error::NotIp(_) => 5,
            Error::BadHeaderLength(_) => 6,
            Error::BadTotalLength { .. } => 7,
            Error::Fragment { .. } => 8,
            Error::NotIpInIp(_) => 9,
            Error::BadChecksum => 10,
            Error::BufferTooSmall { .. } => 11,
            Error::BadTrain { .. } => 12,
            Error::TrailingBytes { .. } => 13,
        }
    }

    /// A short stable label for metrics (`reason="..."`).
    pub const fn label(&self) -> &'static str {
        Error::LABELS[self.index()]
    }
}

#[inline]
pub(crate) fn need(have: usize, needed: usize) -> crate::Result<()> {
    if have < needed {
        Err(Error::Truncated { needed, have })
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_distinct_and_indexed() {
        let all = [
            Error::Truncated { needed: 0, have: 0 },
            Error::BadVersion(0),
            Error::UnknownKind(0),
            Error::BadHopCount(0),
            Error::HopIndexOutOfRange { index: 0, count: 0 },
            Error::NotIp(0),
            Error::BadHeaderLength(0),
            Error::BadTotalLength { total: 0, have: 0 },
            Error::Fragment {
                offset: 0,
                more: false,
            },
            Error::NotIpInIp(0),
            Error::BadChecksum,
            Error::BufferTooSmall { needed: 0, have: 0 },
            Error::BadTrain { index: 0, len: 0 },
            Error::TrailingBytes { extra: 0 },
        ];
        assert_eq!(all.len(), Error::COUNT);
        for (i, e) in all.iter().enumerate() {
            assert_eq!(e.index(), i);
        }
        let mut labels = Error::LABELS.to_vec();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), Error::COUNT);
    }
}
