//! What moves money (pretend money): test cards, amounts, billing periods, and
//! the work done when a checkout is paid and when the clock passes a due time.

use sha2::{Digest, Sha256};
use time::{Date, OffsetDateTime};

use crate::render;
use crate::state::{
    find, new_id, real_now, CheckoutSession, Formula, Invoice, InvoiceLine, InvoiceStatus, Meter,
    Origin, PaymentMethod, SessionStatus, State, Subscription, SubscriptionItem,
    SubscriptionStatus,
};

pub const DAY: i64 = 86_400;

/// One of Stripe's test card numbers, the only kind the stand-in takes.
#[derive(Clone)]
pub struct TestCard {
    pub last4: String,
    pub fingerprint: String,
    /// Attaches, but every charge on it is declined (4000 0000 0000 0341).
    pub declines: bool,
}

impl TestCard {
    /// Spaces and dashes are allowed; anything but the two test numbers is refused.
    pub fn parse(number: &str) -> Option<TestCard> {
        let digits: String = number.chars().filter(|c| !matches!(c, ' ' | '-')).collect();
        let declines = match digits.as_str() {
            "4242424242424242" => false,
            "4000000000000341" => true,
            _ => return None,
        };
        Some(TestCard {
            last4: digits[digits.len() - 4..].to_string(),
            fingerprint: hex::encode(&Sha256::digest(digits.as_bytes())[..8]),
            declines,
        })
    }
}

/// A non-negative amount in cents with up to 12 decimal places, as Stripe's
/// `unit_amount_decimal`; kept as given, computed exactly.
#[derive(Clone, Debug, PartialEq)]
pub struct Decimal {
    text: String,
    units: i128,
    scale: u32,
}

impl Decimal {
    pub fn parse(text: &str) -> Option<Decimal> {
        let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
        let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if whole.is_empty() || !digits(whole) || !digits(fraction) || fraction.len() > 12 {
            return None;
        }
        if text.ends_with('.') || whole.len() > 15 {
            return None;
        }
        Some(Decimal {
            text: text.to_string(),
            units: format!("{whole}{fraction}").parse().ok()?,
            scale: fraction.len() as u32,
        })
    }

    pub fn from_cents(cents: i64) -> Decimal {
        Decimal {
            text: cents.to_string(),
            units: cents.into(),
            scale: 0,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The amount in whole cents, when it has no fraction.
    pub fn whole(&self) -> Option<i64> {
        let unit = 10i128.pow(self.scale);
        (self.units % unit == 0)
            .then(|| i64::try_from(self.units / unit).ok())
            .flatten()
    }

    /// `quantity` times this amount, rounded half up to whole cents.
    pub fn times(&self, quantity: i64) -> i64 {
        let unit = 10i128.pow(self.scale);
        let exact = self.units * i128::from(quantity);
        i64::try_from((exact + unit / 2) / unit).unwrap_or(i64::MAX)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Interval {
    Day,
    Week,
    Month,
    Year,
}

impl Interval {
    pub fn parse(s: &str) -> Option<Interval> {
        Some(match s {
            "day" => Interval::Day,
            "week" => Interval::Week,
            "month" => Interval::Month,
            "year" => Interval::Year,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Interval::Day => "day",
            Interval::Week => "week",
            Interval::Month => "month",
            Interval::Year => "year",
        }
    }

    /// The end of a period starting at `start`: calendar months and years, in
    /// UTC, the day clamped to the month's length (Jan 31 → Feb 28).
    pub fn after(self, start: i64) -> i64 {
        let add_months = |months: i32| {
            let Ok(at) = OffsetDateTime::from_unix_timestamp(start) else {
                return start + 30 * DAY * i64::from(months);
            };
            let index = at.year() * 12 + i32::from(u8::from(at.month())) - 1 + months;
            let (year, month) = (index.div_euclid(12), (index.rem_euclid(12) + 1) as u8);
            let month = time::Month::try_from(month).unwrap_or(time::Month::January);
            let day = at.day().min(month.length(year));
            Date::from_calendar_date(year, month, day)
                .map(|date| at.replace_date(date).unix_timestamp())
                .unwrap_or(start + 30 * DAY * i64::from(months))
        };
        match self {
            Interval::Day => start + DAY,
            Interval::Week => start + 7 * DAY,
            Interval::Month => add_months(1),
            Interval::Year => add_months(12),
        }
    }
}

/// Why a hosted checkout was not paid.
#[derive(Debug, PartialEq)]
pub enum PayError {
    Declined,
    NotOpen(SessionStatus),
}

impl State {
    /// Does everything that has come due by the clock, in time order: expires
    /// open checkout sessions and ends subscription periods (a renewal, or the
    /// cancellation asked for at period end). Called before every request.
    pub fn settle(&mut self) {
        let now = self.now();
        enum Due {
            Session(usize),
            Period(usize),
        }
        loop {
            let session = self
                .sessions
                .iter()
                .enumerate()
                .filter(|(_, s)| s.status == SessionStatus::Open && s.expires_at <= now)
                .map(|(i, s)| (s.expires_at, Due::Session(i)));
            let period = self
                .subscriptions
                .iter()
                .enumerate()
                .filter(|(_, s)| {
                    matches!(
                        s.status,
                        SubscriptionStatus::Active | SubscriptionStatus::PastDue
                    ) && s.period_end <= now
                })
                .map(|(i, s)| (s.period_end, Due::Period(i)));
            match session.chain(period).min_by_key(|(at, _)| *at) {
                None => return,
                Some((at, Due::Session(i))) => self.expire_session(i, at, &Origin::default()),
                Some((at, Due::Period(i))) => self.close_period(i, at),
            }
        }
    }

    /// Moves the clock forward to `target` (never back), does what came due,
    /// then retries once each open invoice of a past-due subscription.
    pub fn advance(&mut self, target: i64) {
        let retries: Vec<String> = self
            .subscriptions
            .iter()
            .filter(|s| s.status == SubscriptionStatus::PastDue)
            .filter_map(|s| s.latest_invoice.clone())
            .collect();
        self.offset = self.offset.max(target - real_now());
        self.settle();
        let now = self.now();
        for invoice in retries {
            let Some(i) = self.invoices.iter().position(|inv| inv.id == invoice) else {
                continue;
            };
            if self.invoices[i].status != InvoiceStatus::Open {
                continue;
            }
            let sub = self.subscription_index(&self.invoices[i].subscription);
            let old = render::subscription(self, &self.subscriptions[sub]);
            let paid = self.attempt_payment(i, now, &Origin::default());
            let invoice = &self.invoices[i];
            let gave_up = invoice.attempt_count >= 3
                && invoice.first_failure.is_some_and(|f| now - f >= 3 * DAY);
            let s = &mut self.subscriptions[sub];
            if paid {
                s.status = SubscriptionStatus::Active;
            } else if gave_up && s.status == SubscriptionStatus::PastDue {
                s.status = SubscriptionStatus::Unpaid;
            }
            self.emit_subscription_updated(sub, &old, now, &Origin::default());
        }
    }

    pub fn expire_session(&mut self, i: usize, at: i64, origin: &Origin) {
        self.sessions[i].status = SessionStatus::Expired;
        let object = render::checkout_session(self, &self.sessions[i]);
        self.emit_at(at, "checkout.session.expired", object, None, origin);
    }

    fn subscription_index(&self, id: &str) -> usize {
        self.subscriptions
            .iter()
            .position(|s| s.id == id)
            .expect("an invoice's subscription exists")
    }

    /// Emits `customer.subscription.updated` if the subscription changed since `old`.
    pub fn emit_subscription_updated(
        &mut self,
        i: usize,
        old: &serde_json::Value,
        at: i64,
        origin: &Origin,
    ) {
        let new = render::subscription(self, &self.subscriptions[i]);
        if let Some(previous) = crate::state::previous_attributes(old, &new) {
            self.emit_at(
                at,
                "customer.subscription.updated",
                new,
                Some(previous),
                origin,
            );
        }
    }

    /// The end of a subscription's period: cancels it if so asked, else bills
    /// the period just ended and starts the next.
    fn close_period(&mut self, i: usize, at: i64) {
        let origin = Origin::default();
        if self.subscriptions[i].cancel_at_period_end {
            let s = &mut self.subscriptions[i];
            s.status = SubscriptionStatus::Canceled;
            s.ended_at = Some(at);
            s.canceled_at.get_or_insert(at);
            let object = render::subscription(self, &self.subscriptions[i]);
            self.emit_at(at, "customer.subscription.deleted", object, None, &origin);
            return;
        }
        let old = render::subscription(self, &self.subscriptions[i]);
        let (start, end) = (
            self.subscriptions[i].period_start,
            self.subscriptions[i].period_end,
        );
        let invoice = self.create_invoice(i, "subscription_cycle", start, end, at);
        let s = &mut self.subscriptions[i];
        s.period_start = end;
        s.period_end = s.interval.after(end);
        s.latest_invoice = Some(self.invoices[invoice].id.clone());
        if !self.attempt_payment(invoice, at, &origin) {
            self.subscriptions[i].status = SubscriptionStatus::PastDue;
        }
        self.emit_subscription_updated(i, &old, at, &origin);
    }

    /// An open invoice for subscription `i` over `[start, end)`: licensed items
    /// at unit amount × quantity, metered items at the meter's total for the
    /// customer over the period (nothing on the first invoice).
    fn create_invoice(
        &mut self,
        i: usize,
        reason: &'static str,
        start: i64,
        end: i64,
        at: i64,
    ) -> usize {
        let sub = &self.subscriptions[i];
        let lines = sub
            .items
            .iter()
            .map(|item| {
                let price = find(&self.prices, &item.price).expect("an item's price exists");
                let product = find(&self.products, &price.product).map(|p| p.name.as_str());
                let meter = price
                    .recurring
                    .as_ref()
                    .and_then(|r| r.meter.as_deref())
                    .and_then(|m| find(&self.meters, m));
                let quantity = match (meter, reason) {
                    (Some(_), "subscription_create") => 0,
                    (Some(meter), _) => self.usage(meter, &sub.customer, start, end),
                    (None, _) => item.quantity.unwrap_or(1),
                };
                InvoiceLine {
                    id: new_id("il"),
                    amount: price.unit_amount_decimal.times(quantity),
                    description: format!("{quantity} × {}", product.unwrap_or("product")),
                    quantity,
                    unit_amount_decimal: price.unit_amount_decimal.as_str().to_string(),
                    subscription_item: item.id.clone(),
                }
            })
            .collect();
        let customer = self
            .customers
            .iter_mut()
            .find(|c| c.id == sub.customer)
            .expect("a subscription's customer exists");
        let number = format!(
            "{}-{:04}",
            customer.invoice_prefix, customer.next_invoice_sequence
        );
        customer.next_invoice_sequence += 1;
        self.invoices.push(Invoice {
            id: new_id("in"),
            number,
            created: at,
            customer: sub.customer.clone(),
            customer_email: customer.email.clone(),
            customer_name: customer.name.clone(),
            subscription: sub.id.clone(),
            subscription_metadata: sub.metadata.clone(),
            currency: sub.currency.clone(),
            billing_reason: reason,
            status: InvoiceStatus::Open,
            lines,
            period_start: start,
            period_end: end,
            attempt_count: 0,
            first_failure: None,
            next_payment_attempt: None,
            paid_at: None,
            test_clock: sub.test_clock.clone(),
        });
        self.invoices.len() - 1
    }

    /// Charges an open invoice to its customer's default card (nothing to
    /// charge for a zero total) and emits `invoice.paid` or
    /// `invoice.payment_failed`. True when paid.
    pub fn attempt_payment(&mut self, i: usize, at: i64, origin: &Origin) -> bool {
        let invoice = &self.invoices[i];
        let paid = invoice.total() == 0 || self.card_pays(&invoice.customer);
        let invoice = &mut self.invoices[i];
        invoice.attempt_count += 1;
        let kind = if paid {
            invoice.status = InvoiceStatus::Paid;
            invoice.paid_at = Some(at);
            invoice.next_payment_attempt = None;
            "invoice.paid"
        } else {
            invoice.first_failure.get_or_insert(at);
            invoice.next_payment_attempt = Some(at + DAY);
            "invoice.payment_failed"
        };
        let object = render::invoice(&self.invoices[i]);
        self.emit_at(at, kind, object, None, origin);
        paid
    }

    fn card_pays(&self, customer: &str) -> bool {
        find(&self.customers, customer)
            .and_then(|c| c.default_payment_method.as_deref())
            .and_then(|pm| find(&self.payment_methods, pm))
            .is_some_and(|pm| !pm.card.declines)
    }

    /// A new payment method for `card`, attached to the customer as the default.
    pub fn attach_card(&mut self, customer: &str, card: TestCard) -> String {
        let id = new_id("pm");
        self.payment_methods.push(PaymentMethod {
            id: id.clone(),
            created: self.now(),
            customer: Some(customer.to_string()),
            card,
        });
        if let Some(c) = self.customers.iter_mut().find(|c| c.id == customer) {
            c.default_payment_method = Some(id.clone());
        }
        id
    }

    /// The meter's aggregate for `customer` over `[start, end)`, counted events only.
    pub fn usage(&self, meter: &Meter, customer: &str, start: i64, end: i64) -> i64 {
        self.meter_events
            .iter()
            .filter(|e| e.counted && e.event_name == meter.event_name && e.customer == customer)
            .filter(|e| start <= e.timestamp && e.timestamp < end)
            .map(|e| match meter.formula {
                Formula::Sum => e.value,
                Formula::Count => 1,
            })
            .sum()
    }

    /// Pays an open checkout session with `card`: a payment method, a
    /// subscription with a paid first invoice, the session complete; then
    /// `customer.subscription.created`, `invoice.paid`,
    /// `checkout.session.completed`, in that order. Returns where to send the
    /// buyer. A declined card changes nothing.
    pub fn pay_checkout(&mut self, id: &str, card: TestCard) -> Result<String, PayError> {
        let now = self.now();
        let i = self
            .sessions
            .iter()
            .position(|s| s.id == id)
            .ok_or(PayError::NotOpen(SessionStatus::Expired))?;
        let session: &CheckoutSession = &self.sessions[i];
        if session.status != SessionStatus::Open {
            return Err(PayError::NotOpen(session.status));
        }
        if card.declines {
            return Err(PayError::Declined);
        }
        let customer = session.customer.clone();
        let interval = session
            .lines
            .first()
            .and_then(|l| find(&self.prices, &l.price))
            .and_then(|p| p.recurring.as_ref())
            .map_or(Interval::Month, |r| r.interval);
        let subscription = Subscription {
            id: new_id("sub"),
            created: now,
            customer: customer.clone(),
            currency: session.currency.clone(),
            interval,
            status: SubscriptionStatus::Active,
            items: session
                .lines
                .iter()
                .map(|l| SubscriptionItem {
                    id: new_id("si"),
                    created: now,
                    price: l.price.clone(),
                    quantity: l.quantity,
                })
                .collect(),
            period_start: now,
            period_end: interval.after(now),
            cancel_at_period_end: false,
            canceled_at: None,
            ended_at: None,
            metadata: session.subscription_metadata.clone(),
            latest_invoice: None,
            test_clock: find(&self.customers, &customer).and_then(|c| c.test_clock.clone()),
        };
        self.attach_card(&customer, card);
        if let Some(c) = self.customers.iter_mut().find(|c| c.id == customer) {
            c.currency
                .get_or_insert_with(|| subscription.currency.clone());
        }
        self.subscriptions.push(subscription);
        let sub = self.subscriptions.len() - 1;
        let period_end = self.subscriptions[sub].period_end;
        let invoice = self.create_invoice(sub, "subscription_create", now, period_end, now);
        let invoice_id = self.invoices[invoice].id.clone();
        let invoice = &mut self.invoices[invoice];
        (invoice.status, invoice.paid_at, invoice.attempt_count) =
            (InvoiceStatus::Paid, Some(now), 1);
        let sub_id = self.subscriptions[sub].id.clone();
        self.subscriptions[sub].latest_invoice = Some(invoice_id.clone());
        let session = &mut self.sessions[i];
        session.status = SessionStatus::Complete;
        session.subscription = Some(sub_id);
        session.invoice = Some(invoice_id.clone());
        let success_url = session
            .success_url
            .replace("{CHECKOUT_SESSION_ID}", &session.id);

        let origin = Origin::default();
        let object = render::subscription(self, &self.subscriptions[sub]);
        self.emit("customer.subscription.created", object, None, &origin);
        let object = render::invoice(find(&self.invoices, &invoice_id).expect("just made"));
        self.emit("invoice.paid", object, None, &origin);
        let object = render::checkout_session(self, &self.sessions[i]);
        self.emit("checkout.session.completed", object, None, &origin);
        Ok(success_url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_two_test_cards_are_taken() {
        let ok = TestCard::parse("4242 4242 4242 4242").unwrap();
        assert_eq!((ok.last4.as_str(), ok.declines), ("4242", false));
        let bad = TestCard::parse("4000-0000-0000-0341").unwrap();
        assert_eq!((bad.last4.as_str(), bad.declines), ("0341", true));
        assert!(TestCard::parse("5555555555554444").is_none());
        assert!(TestCard::parse("").is_none());
    }

    #[test]
    fn decimal_amounts_multiply_exactly_and_round_half_up_to_cents() {
        let half = Decimal::parse("0.5").unwrap();
        assert_eq!(half.times(3), 2);
        assert_eq!(half.times(4), 2);
        assert_eq!(Decimal::parse("0.0125").unwrap().times(1000), 13);
        assert_eq!(Decimal::parse("2000").unwrap().times(2), 4000);
        assert_eq!(Decimal::parse("2000").unwrap().whole(), Some(2000));
        assert_eq!(half.whole(), None);
    }

    #[test]
    fn malformed_decimals_are_refused() {
        for bad in ["", ".5", "5.", "-1", "1e3", "1.2.3", "0.1234567890123"] {
            assert!(Decimal::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn a_month_is_a_calendar_month_with_the_day_clamped() {
        let jan_31 = 1_706_659_200; // 2024-01-31T00:00:00Z
        let feb_29 = 1_709_164_800; // 2024-02-29T00:00:00Z
        assert_eq!(Interval::Month.after(jan_31), feb_29);
        assert_eq!(Interval::Year.after(jan_31), 1_738_281_600); // 2025-01-31
        assert_eq!(Interval::Day.after(jan_31), jan_31 + DAY);
    }
}
