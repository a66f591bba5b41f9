//! ISO 3166-1 alpha-2 country codes, for validating jurisdictions in config and policy files.

/// Officially assigned ISO 3166-1 alpha-2 codes (all 249), sorted.
///
/// Source: ISO 3166-1 as maintained by the ISO 3166 Maintenance Agency, taken from the
/// iso-codes 4.15.0 data set and cross-checked against tzdata `iso3166.tab`;
/// checked 2026-12-03. Reserved (`EU`, `UK`, `EL`) and user-assigned (`XK`, `XX`) codes are
/// deliberately absent.
pub const ALPHA2: &[&str] = &[
    "AD", "AE", "AF", "AG", "AI", "AL", "AM", "AO", "AQ", "AR", "AS", "AT", "AU", "AW", "AX", "AZ", "BA",
    "BB", "BD", "BE", "BF", "BG", "BH", "BI", "BJ", "BL", "BM", "BN", "BO", "BQ", "BR", "BS", "BT", "BV",
    "BW", "BY", "BZ", "CA", "CC", "CD", "CF", "CG", "CH", "CI", "CK", "CL", "CM", "CN", "CO", "CR", "CU",
    "CV", "CW", "CX", "CY", "CZ", "DE", "DJ", "DK", "DM", "DO", "DZ", "EC", "EE", "EG", "EH", "ER", "ES",
    "ET", "FI", "FJ", "FK", "FM", "FO", "FR", "GA", "GB", "GD", "GE", "GF", "GG", "GH", "GI", "GL", "GM",
    "GN", "GP", "GQ", "GR", "GS", "GT", "GU", "GW", "GY", "HK", "HM", "HN", "HR", "HT", "HU", "ID", "IE",
    "IL", "IM", "IN", "IO", "IQ", "IR", "IS", "IT", "JE", "JM", "JO", "JP", "KE", "KG", "KH", "KI", "KM",
    "KN", "KP", "KR", "KW", "KY", "KZ", "LA", "LB", "LC", "LI", "LK", "LR", "LS", "LT", "LU", "LV", "LY",
    "MA", "MC", "MD", "ME", "MF", "MG", "MH", "MK", "ML", "MM", "MN", "MO", "MP", "MQ", "MR", "MS", "MT",
    "MU", "MV", "MW", "MX", "MY", "MZ", "NA", "NC", "NE", "NF", "NG", "NI", "NL", "NO", "NP", "NR", "NU",
    "NZ", "OM", "PA", "PE", "PF", "PG", "PH", "PK", "PL", "PM", "PN", "PR", "PS", "PT", "PW", "PY", "QA",
    "RE", "RO", "RS", "RU", "RW", "SA", "SB", "SC", "SD", "SE", "SG", "SH", "SI", "SJ", "SK", "SL", "SM",
    "SN", "SO", "SR", "SS", "ST", "SV", "SX", "SY", "SZ", "TC", "TD", "TF", "TG", "TH", "TJ", "TK", "TL",
    "TM", "TN", "TO", "TR", "TT", "TV", "TW", "TZ", "UA", "UG", "UM", "US", "UY", "UZ", "VA", "VC", "VE",
    "VG", "VI", "VN", "VU", "WF", "WS", "YE", "YT", "ZA", "ZM", "ZW",
];

/// True when `code` (upper-case) is an officially assigned alpha-2 code.
pub fn is_alpha2(code: &str) -> bool {
    ALPHA2.binary_search(&code).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorted_and_unique() {
        for pair in ALPHA2.windows(2) {
            assert!(pair[0] < pair[1], "{} must sort before {}", pair[0], pair[1]);
        }
    }

    #[test]
    fn has_all_249_codes() {
        assert_eq!(ALPHA2.len(), 249);
    }

    #[test]
    fn codes_are_two_upper_case_letters() {
        for code in ALPHA2 {
            assert!(code.len() == 2 && code.bytes().all(|b| b.is_ascii_uppercase()), "{code}");
        }
    }

    #[test]
    fn known_codes_present() {
        for code in ["DE", "US", "GR", "GB", "BR", "AD", "ZW"] {
            assert!(is_alpha2(code), "{code} should be assigned");
        }
    }

    #[test]
    fn reserved_and_unassigned_codes_absent() {
        // EL (Greece in EU usage) and UK are reserved, not assigned; XX is user-assigned.
        for code in ["EL", "UK", "XX", "EU", "XK", "de", ""] {
            assert!(!is_alpha2(code), "{code} should not be assigned");
        }
    }
}
