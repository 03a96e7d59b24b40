//! Settings named by a word (a dtype, a model family, a write mode): each type lists its names once,
//! in its serde attributes, and plans and the command line parse them the same way, with the same
//! "unknown value, expected one of" message (which plan errors turn into a "did you mean").

use serde::de::{DeserializeOwned, IntoDeserializer};

/// Parse `name` as a `T` (a serde enum of unit variants).
pub fn from_name<T: DeserializeOwned>(name: &str) -> Result<T, String> {
    let de: serde::de::value::StrDeserializer<'_, serde::de::value::Error> =
        name.into_deserializer();
    T::deserialize(de).map_err(|e| e.to_string())
}

/// The name a `T` serializes to.
pub fn name_of<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => String::new(),
    }
}

/// `impl FromStr` and `Display` by the type's serde names (for the command line and messages).
#[macro_export]
macro_rules! named_setting {
    ($t:ty) => {
        impl std::str::FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> std::result::Result<Self, String> {
                $crate::named::from_name(s)
            }
        }
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&$crate::named::name_of(self))
            }
        }
    };
}

#[cfg(test)]
mod tests {
    #[derive(Debug, PartialEq, serde::Deserialize, serde::Serialize)]
    #[serde(rename_all = "kebab-case")]
    enum Colour {
        Red,
        #[serde(alias = "sky")]
        LightBlue,
    }
    crate::named_setting!(Colour);

    #[test]
    fn names_parse_and_print_through_serde() {
        assert_eq!("light-blue".parse::<Colour>(), Ok(Colour::LightBlue));
        assert_eq!("sky".parse::<Colour>(), Ok(Colour::LightBlue));
        assert_eq!(Colour::Red.to_string(), "red");
        let e = "green".parse::<Colour>().unwrap_err();
        assert!(
            e.contains("unknown variant `green`") && e.contains("`red`, `light-blue`"),
            "{e}"
        );
    }
}
