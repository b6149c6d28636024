//! A MAC address as the launch configuration carries it: six bytes,
//! written as `"02:00:00:00:00:01"` (in JSON too), so that a hand-written
//! configuration reads like `ip link` prints it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Errors parsing a MAC address.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MacError {
    #[error("invalid MAC address '{0}': expected six hexadecimal bytes separated by ':', like 02:00:00:00:00:01")]
    Syntax(String),
}

/// A 48-bit Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The six bytes, first one sent first.
    pub fn bytes(&self) -> [u8; 6] {
        self.0
    }

    /// Whether this is a multicast (or broadcast) address: bit 0 of the
    /// first byte. A NIC cannot have one.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl FromStr for MacAddr {
    type Err = MacError;

    fn from_str(s: &str) -> Result<Self, MacError> {
        let bad = || MacError::Syntax(s.to_string());
        let mut bytes = [0u8; 6];
        let mut parts = s.split(':');
        for byte in bytes.iter_mut() {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 || !part.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(bytes))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_the_colon_form() {
        let mac: MacAddr = "02:00:0A:ff:00:01".parse().unwrap();
        assert_eq!(mac, MacAddr([2, 0, 0x0a, 0xff, 0, 1]));
        assert_eq!(mac.to_string(), "02:00:0a:ff:00:01");
        assert!(!mac.is_multicast());
        assert!("01:00:5e:00:00:01"
            .parse::<MacAddr>()
            .unwrap()
            .is_multicast());
        assert!("ff:ff:ff:ff:ff:ff"
            .parse::<MacAddr>()
            .unwrap()
            .is_multicast());
    }

    #[test]
    fn malformed_addresses_are_refused_with_the_expected_form() {
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:01:02",
            "02:00:00:00:00:1",
            "02:00:00:00:00:001",
            "02-00-00-00-00-01",
            "02:00:00:00:00:0g",
            "+2:00:00:00:00:01",
            "02:00:00:00:00:01:",
        ] {
            let err = bad.parse::<MacAddr>().unwrap_err();
            assert_eq!(err, MacError::Syntax(bad.to_string()));
            assert!(err.to_string().contains("02:00:00:00:00:01"), "{err}");
        }
    }

    #[test]
    fn json_is_the_string_form() {
        let mac = MacAddr([2, 0, 0, 0, 0, 1]);
        let json = serde_json::to_string(&mac).unwrap();
        assert_eq!(json, r#""02:00:00:00:00:01""#);
        assert_eq!(serde_json::from_str::<MacAddr>(&json).unwrap(), mac);
        let err = serde_json::from_str::<MacAddr>(r#""02:00""#).unwrap_err();
        assert!(
            err.to_string().contains("invalid MAC address '02:00'"),
            "{err}"
        );
        assert!(serde_json::from_str::<MacAddr>("[2,0,0,0,0,1]").is_err());
    }
}
